"""KNNStore persistence: directory save/load (with and without mmap), state_dict round trips, the two forms
restoring the same store, arrays saved at the high-water mark, and stores growing after loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmt.kernel.store_files import file_record
from dmt.memory import ORIGIN_SPAN, KNNStore
from dmt.memory.state import SLOT_ARRAYS, check_settings


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
        tokens = rng.integers(-1, 50_000, (30, ORIGIN_SPAN))
        following = rng.integers(-1, 50_000, 30)
        store.insert(
            rng.standard_normal((30, 8)), rng.standard_normal((30, 3)), np.arange(30), tokens, following
        )
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
    """Same entries, bookkeeping and answers; then (stores that insert) the same slots for new entries,
    which fill the holes and grow a truncated store."""
    queries = np.random.default_rng(1).standard_normal((10, store.key_dim)).astype(np.float32)
    assert restored.stats == store.stats and restored.now == store.now
    assert restored.eviction == store.eviction and restored.capacity == store.capacity
    live = store.live_ids()
    np.testing.assert_array_equal(restored.live_ids(), live)
    for method in ("insertion_times", "lrfu_scores", "read_counts"):
        got, want = getattr(restored, method)(live), getattr(store, method)(live)
        np.testing.assert_array_equal(got, want, err_msg=method)
    for got, want in zip(restored.origins(live), store.origins(live), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(restored.next_tokens(live), store.next_tokens(live))
    for got, want in zip(_answers(restored, queries), _answers(store, queries), strict=True):
        np.testing.assert_array_equal(got, want)
    if store.keys_are_fixed:
        return
    # LRFU state, insertion times and the clock came along too: the same victims are evicted next.
    keys = np.ones((20, store.key_dim), dtype=np.float32)
    values = np.zeros((20, store.value_dim), dtype=np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(store.insert(keys, values), restored.insert(keys, values))
    np.testing.assert_array_equal(restored.get(restored.live_ids())[1], store.get(store.live_ids())[1])


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
        "read_count.npy",
        "origin_unit.npy",
        "origin_tokens.npy",
        "next_token.npy",
    }
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert manifest["format_version"] == 4
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
    assert restored.state().values.dtype == np.dtype(value_dtype)
    _assert_equivalent(store, restored)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def test_mmap_load_never_changes_the_files(tmp_path: Path) -> None:
    """Writes to a memory-mapped store stay in memory (copy-on-write) until it is saved: the directory it
    was loaded from keeps its bytes and verifies; saving onto it then keeps the writes."""
    store = _filled_store()
    store.save(tmp_path / "mem")
    saved = _file_bytes(tmp_path / "mem")
    mapped = KNNStore.load(tmp_path / "mem", mmap=True)
    assert isinstance(mapped.state().keys, np.memmap) and isinstance(mapped.state().values, np.memmap)
    _assert_equivalent(store, mapped)
    before = mapped.get(np.array([0]))[1]
    mapped.update_values(np.array([0]), np.full((1, 3), 10.0, dtype=np.float32))
    expected = mapped.get(np.array([0]))[1]
    assert _file_bytes(tmp_path / "mem") == saved
    np.testing.assert_array_equal(KNNStore.load(tmp_path / "mem", verify=True).get(np.array([0]))[1], before)
    mapped.save(tmp_path / "mem")  # saving onto its own mapped files writes what it holds
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
    state["live"] = np.ones(65, dtype=bool)  # more rows than the capacity of 64
    with pytest.raises(
        ValueError, match=r"state_dict\['live'\]: expected shape \(H,\) with H <= capacity 64"
    ):
        KNNStore.from_state_dict(state)


def test_state_gives_the_stores_own_arrays_and_from_state_holds_them_as_given() -> None:
    store = _filled_store("float16")
    state = store.state()
    assert tuple(state.slots) == SLOT_ARRAYS and state.now == store.now
    names = ("key_dim", "value_dim", "capacity", "metric", "lrfu_lambda", "value_dtype", "eviction")
    settings = check_settings(*(getattr(store, name) for name in names))
    twin = KNNStore.from_state(settings, state).state()
    assert twin.keys is state.keys and twin.values is state.values and twin.index is state.index
    assert all(twin.slots[name] is array for name, array in state.slots.items())
    queries = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    restored = KNNStore.from_state(settings, state)
    for got, want in zip(restored.search(queries, 6), store.search(queries, 6), strict=True):
        np.testing.assert_array_equal(got, want)


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


def _store_with_holes(backend: str) -> KNNStore:
    """40 entries inserted into 64 slots, then merged: holes below the high-water mark. Product keys (which
    cannot insert or merge) get value updates instead."""
    rng = np.random.default_rng(2)
    metric = "ip" if backend == "product" else "l2"
    store = KNNStore(8, 3, capacity=64, metric=metric, index={"backend": backend}, value_dtype="float16")
    if backend == "product":
        store.update_values(np.arange(0, 64, 3), rng.standard_normal((22, 3)).astype(np.float32))
    else:
        units = np.arange(40) % 7
        tokens = rng.integers(0, 1000, (40, ORIGIN_SPAN))
        store.insert(rng.standard_normal((40, 8)), rng.standard_normal((40, 3)), units, tokens)
    ids, distances = store.search(rng.standard_normal((6, 8)).astype(np.float32), k=4)
    store.reference(ids)
    if backend != "product":
        assert store.recombine(ids, distances, max_distance=np.inf) > 0
    return store


@pytest.mark.parametrize("backend", ["exact", "hnsw", "product", "faiss", "scann"])
@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_round_trip_restores_an_identical_store_that_grows(
    tmp_path: Path, backend: str, mmap: bool
) -> None:
    store = _store_with_holes(backend)
    live = store.live_ids()
    high_water = int(live[-1]) + 1
    assert backend == "product" or len(live) < high_water  # holes below the high-water mark
    store.save(tmp_path / "mem")
    # An l2 (or ip) hnsw graph holds the keys exactly: they are saved there only (keys once).
    assert (tmp_path / "mem" / "keys.npy").exists() == (backend != "hnsw")
    assert np.load(tmp_path / "mem" / "values.npy").shape[0] == high_water
    assert (tmp_path / "mem" / "index.bin").exists() == (backend in ("hnsw", "product"))
    for restored in (
        KNNStore.load(tmp_path / "mem", mmap=mmap),
        KNNStore.from_state_dict(store.state_dict()),
    ):
        state = restored.state()
        assert len(state.keys) == len(state.values) == high_water  # as loaded, not padded
        _assert_equivalent(_store_with_holes(backend), restored)  # inserts fill the holes, then grow
        assert len(restored.state().keys) == (high_water if backend == "product" else 64)


def test_mmap_store_maps_keys_and_values_until_it_grows(tmp_path: Path) -> None:
    store = _store_with_holes("exact")
    store.save(tmp_path / "mem")
    mapped = KNNStore.load(tmp_path / "mem", mmap=True)
    holes = 64 - len(mapped) - (64 - len(mapped.state().keys))  # free slots below the high-water mark
    key = np.full((1, 8), 3.0, dtype=np.float32)
    slots = mapped.insert(np.repeat(key, holes, axis=0), np.ones((holes, 3), dtype=np.float32))
    keys = mapped.state().keys
    assert slots.max() < len(keys) and isinstance(keys, np.memmap)  # written to the mapped pages
    np.testing.assert_array_equal(keys[slots], np.repeat(key, holes, axis=0))
    keys.flush()  # a copy-on-write map never writes back
    assert not (np.load(tmp_path / "mem" / "keys.npy")[slots] == key).all(axis=1).any()
    mapped.insert(key, np.ones((1, 3), dtype=np.float32))  # no hole left: the store grows into memory
    assert len(mapped.state().keys) == 64 and not isinstance(mapped.state().keys, np.memmap)
    assert not isinstance(mapped.state().values, np.memmap)


def test_sparse_store_saves_its_live_rows_without_an_exact_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    store = KNNStore(16, 32, capacity=4096, metric="ip", index={"backend": "exact"})
    store.insert(rng.standard_normal((100, 16)), rng.standard_normal((100, 32)))
    store.save(tmp_path / "mem")
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert manifest["capacity"] == 4096 and manifest["entries"] == 100
    assert "index.bin" not in manifest["files"] and not (tmp_path / "mem" / "index.bin").exists()
    for name in ("keys", "values", "live", "lrfu_crf", "read_count", "origin_tokens"):
        assert len(np.load(tmp_path / "mem" / f"{name}.npy")) == 100, name
    # Values of 100 rows, not 4096: well under what the padded (4096, 32) float32 array would take.
    assert manifest["files"]["values.npy"]["bytes"] < 100 * 32 * 4 + 1024
    restored = KNNStore.load(tmp_path / "mem")
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(restored.search(queries, 10)[0], store.search(queries, 10)[0])


def test_empty_store_round_trips_and_grows(tmp_path: Path) -> None:
    store = KNNStore(4, 2, capacity=16, metric="l2", index={"backend": "exact"})
    store.save(tmp_path / "mem")
    assert np.load(tmp_path / "mem" / "keys.npy").shape == (0, 4)
    restored = KNNStore.load(tmp_path / "mem", mmap=True)
    assert len(restored) == 0 and len(restored.state().keys) == 0
    keys = np.eye(4, dtype=np.float32)[:3]
    np.testing.assert_array_equal(restored.insert(keys, np.ones((3, 2))), [0, 1, 2])
    np.testing.assert_array_equal(restored.search(keys[1:2], 1)[0], [[1]])


def test_a_store_saved_before_next_tokens_were_recorded_loads_with_them_unknown(tmp_path: Path) -> None:
    store = _filled_store()
    store.save(tmp_path / "mem")
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    del manifest["files"]["next_token.npy"]
    (tmp_path / "mem" / "next_token.npy").unlink()
    (tmp_path / "mem" / "manifest.json").write_text(json.dumps(manifest))
    live = store.live_ids()
    for restored in (
        KNNStore.load(tmp_path / "mem"),
        KNNStore.from_state_dict({k: v for k, v in store.state_dict().items() if k != "next_token"}),
    ):
        np.testing.assert_array_equal(restored.next_tokens(live), np.full(len(live), -1))
        np.testing.assert_array_equal(restored.origins(live)[1], store.origins(live)[1])
