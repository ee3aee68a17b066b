"""KNNStore persistence: directory save/load (with and without mmap), state_dict round trips, and the
two forms restoring the same store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmt.memory import KNNStore
from dmt.memory.integrity import file_record


def _filled_store(value_dtype: str = "float32", backend: str = "hnsw", eviction: str = "lrfu") -> KNNStore:
    rng = np.random.default_rng(0)
    store = KNNStore(
        8,
        3,
        capacity=64,
        metric="cosine",
        lrfu_lambda=0.25,
        value_dtype=value_dtype,
        index={"backend": backend},
        eviction=eviction,
    )
    for _ in range(3):  # 90 inserts into 64 slots: evictions and LRFU state worth saving
        store.insert(rng.standard_normal((30, 8)), rng.standard_normal((30, 3)))
        ids, _ = store.search(rng.standard_normal((4, 8)).astype(np.float32), k=5)
        store.reference(ids)
    return store


def _answers(store: KNNStore, queries: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ids, distances, keys and values of the top 6 of ``queries``; the returned entries are referenced."""
    ids, distances = store.search(queries, k=6)
    found = ids[ids >= 0]
    store.reference(found)
    return (ids, distances, *store.get(found))


def _assert_equivalent(store: KNNStore, restored: KNNStore) -> None:
    queries = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    assert restored.stats == store.stats and restored.now == store.now
    assert restored.eviction == store.eviction
    live = np.flatnonzero(store._live)
    np.testing.assert_array_equal(restored.insertion_times(live), store.insertion_times(live))
    for got, want in zip(_answers(restored, queries), _answers(store, queries), strict=True):
        np.testing.assert_array_equal(got, want)
    # LRFU state, insertion times and the clock came along too: the same victims are evicted next.
    keys, values = np.ones((20, 8), dtype=np.float32), np.zeros((20, 3), dtype=np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(store.insert(keys, values), restored.insert(keys, values))


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_save_load_round_trip(tmp_path: Path, value_dtype: str) -> None:
    store = _filled_store(value_dtype)
    store.save(tmp_path / "mem")
    names = {p.name for p in (tmp_path / "mem").iterdir()}
    assert names == {
        "manifest.json",
        "index.bin",
        "keys.npy",
        "values.npy",
        "live.npy",
        "lrfu_crf.npy",
        "lrfu_last.npy",
        "inserted_at.npy",
    }
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert (manifest["key_dim"], manifest["value_dim"], manifest["capacity"]) == (8, 3, 64)
    assert (manifest["metric"], manifest["lrfu_lambda"], manifest["value_dtype"]) == (
        "cosine",
        0.25,
        value_dtype,
    )
    assert manifest["entries"] == 64 and manifest["stats"]["evictions"] == 26
    assert manifest["eviction"] == "lrfu" and manifest["stats"]["reads"] == 60
    assert set(manifest["index_params"]) == {"backend", "M", "ef_construction", "ef_search", "num_threads"}
    assert manifest["index_params"]["ef_search"] is None  # derived per search: JSON null
    restored = KNNStore.load(tmp_path / "mem")
    assert restored._values.dtype == np.dtype(value_dtype)
    _assert_equivalent(store, restored)


def test_mmap_load_writes_through_to_file(tmp_path: Path) -> None:
    store = _filled_store()
    store.save(tmp_path / "mem")
    mapped = KNNStore.load(tmp_path / "mem", mmap=True)
    assert isinstance(mapped._values, np.memmap)
    _assert_equivalent(store, mapped)
    mapped.update_values(np.array([0]), np.full((1, 3), 10.0, dtype=np.float32))
    expected = mapped.get(np.array([0]))[1]
    mapped.save(tmp_path / "mem")  # saving onto its own mapped file must flush, not truncate it
    np.testing.assert_array_equal(KNNStore.load(tmp_path / "mem").get(np.array([0]))[1], expected)


def test_load_rejects_mismatched_files(tmp_path: Path) -> None:
    store = _filled_store()
    store.save(tmp_path / "mem")
    # A well-formed file of the wrong shape, recorded as such: integrity passes, the shape check not.
    keys = tmp_path / "mem" / "keys.npy"
    np.save(keys, np.zeros((64, 7), dtype=np.float32))
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    manifest["files"]["keys.npy"] = file_record(keys)
    (tmp_path / "mem" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"keys\.npy.*shape"):
        KNNStore.load(tmp_path / "mem")
    with pytest.raises(FileNotFoundError, match="manifest"):
        KNNStore.load(tmp_path / "missing")


def _assert_plain(value: Any) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _assert_plain(item)
    else:
        # None: an hnsw ef_search derived per search
        assert value is None or isinstance(value, (np.ndarray, int, float, str))
        assert not isinstance(value, np.memmap)
        assert not (isinstance(value, np.ndarray) and value.dtype == object)


def test_state_dict_round_trip() -> None:
    store = _filled_store("float16")
    state = store.state_dict()
    _assert_plain(state)
    assert state["index_bytes"].dtype == np.uint8
    _assert_equivalent(store, KNNStore.from_state_dict(state))
    state["live"] = state["live"][:10]
    with pytest.raises(ValueError, match=r"state_dict\['live'\]"):
        KNNStore.from_state_dict(state)


@pytest.mark.parametrize(("backend", "eviction"), [("hnsw", "lrfu"), ("exact", "fifo"), ("hnsw", "random")])
def test_checkpoint_and_directory_restore_equal_stores(tmp_path: Path, backend: str, eviction: str) -> None:
    store = _filled_store("float16", backend, eviction)
    store.save(tmp_path / "mem")
    from_directory = KNNStore.load(tmp_path / "mem")
    from_checkpoint = KNNStore.from_state_dict(store.state_dict())
    directory_state, checkpoint_state = from_directory.state_dict(), from_checkpoint.state_dict()
    assert directory_state.keys() == checkpoint_state.keys()
    for name, value in directory_state.items():  # every array, the index's bytes and every field
        if isinstance(value, np.ndarray):
            assert value.dtype == checkpoint_state[name].dtype
            np.testing.assert_array_equal(value, checkpoint_state[name])
        else:
            assert value == checkpoint_state[name], name
    _assert_equivalent(from_directory, from_checkpoint)
