"""Saved-store integrity: every corruption is reported naming its file; saves are atomic."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmt.kernel.store_files import file_record
from dmt.memory import KNNStore, MemoryStoreError

ARRAYS = (
    "keys",
    "values",
    "live",
    "lrfu_crf",
    "lrfu_last",
    "inserted_at",
    "read_count",
    "origin_unit",
    "origin_tokens",
    "next_token",
)
DATA_FILES = [*(f"{name}.npy" for name in ARRAYS), "index.bin"]
ALL_FILES = [*DATA_FILES, "manifest.json"]
QUERIES = np.random.default_rng(7).standard_normal((6, 8)).astype(np.float32)


def _store(seed: int = 0) -> KNNStore:
    rng = np.random.default_rng(seed)
    # cosine: the graph holds normalised keys, so keys.npy is saved too and every file is checked
    store = KNNStore(8, 3, capacity=32, metric="cosine", value_dtype="float16")
    store.insert(rng.standard_normal((40, 8)), rng.standard_normal((40, 3)))  # evicts: LRFU state to save
    ids, _ = store.search(rng.standard_normal((3, 8)).astype(np.float32), k=4)
    store.reference(ids)
    return store


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    directory = tmp_path / "mem"
    _store().save(directory)
    return directory


def _results(directory: Path, **load_args: Any) -> dict[str, np.ndarray]:
    store = KNNStore.load(directory, **load_args)
    ids, distances = store.search(QUERIES, k=5)  # a full store: no padding
    return {"ids": ids, "values": store.get(ids.ravel())[1], "distances": distances}


def _edit_manifest(directory: Path, edit: Any) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _fails(directory: Path, fragment: str, **load_args: Any) -> None:
    with pytest.raises(MemoryStoreError, match=fragment):
        KNNStore.load(directory, **load_args)


@pytest.mark.parametrize("name", ALL_FILES)
def test_truncated_file_is_named(saved: Path, name: str) -> None:
    path = saved / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fragment = "not valid JSON" if name == "manifest.json" else r"size \d+ bytes, manifest.json says \d+"
    _fails(saved, rf"{re.escape(name)}: {fragment}")
    if name != "manifest.json":  # sizes are checked even without checksums
        _fails(saved, re.escape(name), verify=False)


@pytest.mark.parametrize("name", ALL_FILES)
def test_flipped_byte_is_named(saved: Path, name: str) -> None:
    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the manifest this always makes invalid UTF-8
    path.write_bytes(bytes(data))
    fragment = "not valid JSON" if name == "manifest.json" else "checksum mismatch"
    _fails(saved, rf"{re.escape(name)}: {fragment}")


def test_verify_false_skips_only_checksums(saved: Path) -> None:
    expected = _results(saved)
    path = saved / "values.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last value changes; sizes and shapes stay right
    path.write_bytes(bytes(data))
    _fails(saved, "values.npy: checksum mismatch")
    corrupted = _results(saved, verify=False)  # the documented cost of skipping checksums
    np.testing.assert_array_equal(corrupted["ids"], expected["ids"])


@pytest.mark.parametrize("name", DATA_FILES)
def test_missing_file_is_named(saved: Path, name: str) -> None:
    (saved / name).unlink()
    _fails(saved, rf"{re.escape(name)}: missing")


def test_missing_manifest(saved: Path) -> None:
    (saved / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        KNNStore.load(saved)


def test_invalid_json_manifest(saved: Path) -> None:
    (saved / "manifest.json").write_text('{"format_version": 2,')
    _fails(saved, r"manifest\.json: not valid JSON")
    (saved / "manifest.json").write_text("[2]")
    _fails(saved, r"manifest\.json: expected a JSON object")


def _set(field: str, value: Any) -> Any:
    return lambda manifest: manifest.__setitem__(field, value)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_set("key_dim", 7), r"keys\.npy: expected shape \(32, 7\)"),
        (_set("value_dim", 4), r"values\.npy: expected shape \(32, 4\)"),
        (_set("value_dtype", "float32"), r"values\.npy: expected .* dtype float32"),
        (_set("capacity", 31), r"live\.npy: expected shape \(H,\) with H <= capacity 31"),
        (_set("entries", 31), r"live\.npy: 32 live entries, .*manifest\.json says 31"),
        (_set("format_version", 99), r"manifest\.json: format_version 99 is not supported"),
        (_set("format_version", "3"), r"manifest\.json: format_version '3' is not supported"),
        (_set("metric", "hamming"), r"manifest\.json: unknown metric 'hamming'"),
        (_set("capacity", 0), r"manifest\.json: capacity must be an integer >= 1"),
        (_set("key_dim", True), r"manifest\.json: field 'key_dim' has the wrong type"),
        (_set("now", -1), r"manifest\.json: field 'now' must be >= 0"),
        (_set("stats", {"inserts": 1, "bogus": 2}), r"manifest\.json: field 'stats'"),
        (_set("index_params", {"M": "16"}), r"manifest\.json: field 'index_params'"),
        (
            _set("index_params", {"M": None}),
            r"field 'index_params' .* integers "
            r"\(ef_search, nlist, nprobe, leaves, leaves_to_search also to null\)",
        ),
        (_set("stats", {"reads": None}), r"manifest\.json: field 'stats' must map .* to integers, got"),
        (_set("eviction", "lifo"), r"manifest\.json: eviction must be one of lrfu, fifo, random"),
        (_set("eviction", 0), r"manifest\.json: field 'eviction' has the wrong type"),
        (_set("index_params", {"backend": "usearch"}), r"manifest\.json: .*unknown backend 'usearch'"),
        (lambda m: m.pop("lrfu_lambda"), r"manifest\.json: missing field 'lrfu_lambda'"),
        (lambda m: m.pop("eviction"), r"manifest\.json: missing field 'eviction'"),
        (lambda m: m["files"].pop("live.npy"), r"manifest\.json: no integrity record for live\.npy"),
        (lambda m: m["files"].pop("index.bin"), r"manifest\.json: no integrity record for index\.bin"),
        (lambda m: m["files"]["keys.npy"].update(bytes=1), r"keys\.npy: size \d+ bytes"),
        (lambda m: m["files"]["index.bin"].update(sha256="0" * 64), r"index\.bin: checksum mismatch"),
        (lambda m: m["files"].update({"../x": m["files"]["keys.npy"]}), r"'\.\./x' is not a plain"),
    ],
)
def test_edited_manifest_field_is_reported(saved: Path, edit: Any, fragment: str) -> None:
    _edit_manifest(saved, edit)
    _fails(saved, fragment)


def test_corrupt_index_recorded_as_such_is_named(saved: Path) -> None:
    (saved / "index.bin").write_bytes(b"\0" * 64)  # checksummed below: only loading the index can tell
    _edit_manifest(saved, lambda m: m["files"].update({"index.bin": file_record(saved / "index.bin")}))
    _fails(saved, r"index\.bin: not a usable key index")


def test_extra_or_renamed_files(saved: Path) -> None:
    expected = _results(saved)
    (saved / "notes.txt").write_text("extra files are ignored")
    np.testing.assert_array_equal(_results(saved)["ids"], expected["ids"])
    (saved / "keys.npy").rename(saved / "keys.old.npy")
    _fails(saved, r"keys\.npy: missing")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_format_directory_is_refused(saved: Path, version: int) -> None:
    def make_older(manifest: dict[str, Any]) -> None:
        manifest.update(format_version=version)
        for name in ("read_count.npy", "origin_unit.npy", "origin_tokens.npy"):  # added by format 4
            manifest["files"].pop(name)
        if version <= 2:
            manifest.pop("eviction")  # format 2 had no eviction policy and no insertion times
            manifest["files"].pop("inserted_at.npy")
        if version == 1:
            manifest.pop("files")  # nor had format 1 integrity records

    _edit_manifest(saved, make_older)
    manifest = re.escape(str(saved / "manifest.json"))
    _fails(saved, rf"^{manifest}: format_version {version} is not supported \(expected 4\)$")


def _fail_on_nth_save(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    calls = {"count": 0}
    real_save = np.save

    def save(*args: Any, **kwargs: Any) -> None:
        calls["count"] += 1
        if calls["count"] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", save)


def test_failed_save_keeps_previous_store(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _results(saved)
    _fail_on_nth_save(monkeypatch, 3)
    with pytest.raises(OSError, match=re.escape(str(saved))) as caught:
        _store(seed=1).save(saved)
    assert caught.value.errno == errno.ENOSPC and "No space left" in str(caught.value)
    assert [path.name for path in saved.parent.iterdir()] == ["mem"]  # no temporary directory left
    for field, array in _results(saved).items():
        np.testing.assert_array_equal(array, expected[field])


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_nth_save(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        _store().save(tmp_path / "mem")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_store_but_refuses_other_directories(tmp_path: Path) -> None:
    target = tmp_path / "mem"
    _store(seed=0).save(target)
    _store(seed=1).save(target)
    np.testing.assert_array_equal(_results(target)["ids"], _results_of(_store(seed=1)))
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("irreplaceable")
    with pytest.raises(OSError, match="is not a memory store"):
        _store().save(other)
    assert [path.name for path in other.iterdir()] == ["thesis.tex"]


def _results_of(store: KNNStore) -> np.ndarray:
    return store.search(QUERIES, k=5)[0]


def test_mmap_store_saved_onto_itself_keeps_later_writes(saved: Path) -> None:
    mapped = KNNStore.load(saved, mmap=True)
    ids = np.array([0, 5])
    for step in (1.0, 2.0):  # the second write goes to the file the first save created
        mapped.update_values(ids, np.full((2, 3), step, dtype=np.float32))
        mapped.save(saved)
        np.testing.assert_array_equal(KNNStore.load(saved).get(ids)[1], mapped.get(ids)[1])
    assert [path.name for path in saved.parent.iterdir()] == ["mem"]


# ---------------------------------------------------------------------- state_dict


def _drop(key: str) -> Any:
    return lambda state: state.pop(key)


def _put(key: str, value: Any) -> Any:
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_drop("keys"), r"state_dict: missing entry 'keys'"),
        (_drop("index_bytes"), r"state_dict: missing entry 'index_bytes'"),
        (_drop("capacity"), r"state_dict: missing field 'capacity'"),
        (_drop("inserted_at"), r"state_dict: missing entry 'inserted_at'"),
        (_drop("eviction"), r"state_dict: missing field 'eviction'"),
        (
            _put("inserted_at", np.zeros(32, dtype=np.int32)),
            r"state_dict\['inserted_at'\]: expected .* int64",
        ),
        (_put("keys", np.zeros((32, 8), dtype=np.float64)), r"state_dict\['keys'\]: expected .* float32"),
        (_put("values", np.zeros((31, 3), dtype=np.float16)), r"state_dict\['values'\]: expected shape"),
        (_put("lrfu_last", [[1, 2], [3]]), r"state_dict\['lrfu_last'\]: not an array"),
        (_put("live", np.zeros(32, dtype=bool)), r"state_dict\['live'\]: 0 live entries"),
        (_put("index_bytes", np.zeros((2, 8), dtype=np.uint8)), r"'index_bytes'\]: expected a 1-D"),
        (_put("index_bytes", np.zeros(64, dtype=np.uint8)), r"state_dict\['index_bytes'\]: not a usable"),
        (_put("metric", 3), r"state_dict: field 'metric' has the wrong type"),
    ],
)
def test_state_dict_errors_name_the_entry(edit: Any, fragment: str) -> None:
    state = _store().state_dict()
    edit(state)
    with pytest.raises(MemoryStoreError, match=fragment):
        KNNStore.from_state_dict(state)


def test_state_dict_must_be_a_mapping() -> None:
    with pytest.raises(MemoryStoreError, match="expected a mapping, got list"):
        KNNStore.from_state_dict([])  # type: ignore[arg-type]
