"""A ``KNNStore`` on disk and in a checkpoint: one capture, one restore, two containers.

:func:`capture` takes a store apart into its *fields* (settings, entry count, clock, counters: JSON-able
scalars and dicts), its arrays and its key index; :func:`restore` puts one back together and checks every
field and array against the others, so a container only has to deliver the pieces. The containers:

- a **directory** (:func:`save` / :func:`load`, for exports): ``manifest.json`` (the fields plus the size
  and SHA-256 of every other file), one ``.npy`` per array and the index file ``index.bin``. It is written
  atomically and verified with :mod:`dmt.memory.integrity`, and its values may stay memory-mapped, so a
  store can exceed RAM;
- a **checkpoint** dict (:func:`state_dict` / :func:`from_state_dict`, inside training checkpoints): the
  fields, the arrays and the index file's bytes as a ``uint8`` array; numpy only, never pickled objects.

Being the store's persistence, this module reads and sets the store's private state; ``KNNStore``'s own
``save``/``load``/``state_dict``/``from_state_dict`` only delegate here.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from dmt.memory.backends import HNSW_PARAMS, load_index
from dmt.memory.base import MemoryStats
from dmt.memory.index import KeyIndex
from dmt.memory.integrity import (
    MANIFEST,
    MemoryStoreError,
    file_record,
    fsync_path,
    read_manifest,
    verify_files,
    write_array,
    write_directory,
)

if TYPE_CHECKING:
    from dmt.memory.store import KNNStore

# Each container has its own version. Directory format 2 added the integrity records ("files"); directory
# format 3 and checkpoint format 2 added the eviction policy, the insertion times and the `reads` counter.
DIRECTORY_FORMAT_VERSION = 3
CHECKPOINT_FORMAT_VERSION = 2
INDEX_FILE = "index.bin"
# Array name → file name in a directory; the names are also the keys of a checkpoint dict.
ARRAY_FILES = {
    "keys": "keys.npy",
    "values": "values.npy",
    "live": "live.npy",
    "lrfu_crf": "lrfu_crf.npy",
    "lrfu_last": "lrfu_last.npy",
    "inserted_at": "inserted_at.npy",
}
# Every file of a directory but the manifest, by the name a checkpoint dict gives its content.
STORE_FILES = {**ARRAY_FILES, "index_bytes": INDEX_FILE}

# Field → accepted types (bools are rejected separately although they are Integral).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key_dim": numbers.Integral,
    "value_dim": numbers.Integral,
    "capacity": numbers.Integral,
    "metric": str,
    "lrfu_lambda": numbers.Real,
    "value_dtype": str,
    "eviction": str,
    "index_params": Mapping,
    "entries": numbers.Integral,
    "now": numbers.Integral,
    "stats": Mapping,
}
# Integer-valued sub-dicts of the fields → (the names they may hold, those that may also be None).
# ``index_params`` may also name its ``backend``, checked separately as a string; its ``ef_search`` is None
# when derived per search from k and the size.
_COUNTER_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stats": (tuple(field.name for field in dataclasses.fields(MemoryStats)), ()),
    "index_params": (HNSW_PARAMS, ("ef_search",)),
}


class Captured(NamedTuple):
    """A store taken apart: what both containers hold, each in its own form."""

    fields: dict[str, Any]  # the _FIELDS: settings, entry count, LRFU clock, counters
    arrays: dict[str, np.ndarray]  # every ARRAY_FILES name → the store's own array (not a copy)
    index: KeyIndex  # written as the index file, or as that file's bytes


def capture(store: KNNStore) -> Captured:
    """``store`` as fields, arrays and key index, for a container to write."""
    fields = {
        "key_dim": store.key_dim,
        "value_dim": store.value_dim,
        "capacity": store.capacity,
        "metric": store.metric,
        "lrfu_lambda": store.lrfu_lambda,
        "value_dtype": store.value_dtype,
        "eviction": store.eviction,
        "index_params": store._index.params,
        "entries": len(store),
        "now": store.now,
        "stats": dataclasses.asdict(store._stats),
    }
    arrays = {
        "keys": store._keys,
        "values": store._values,
        "live": store._live,
        "lrfu_crf": store._lrfu.crf,
        "lrfu_last": store._lrfu.last,
        "inserted_at": store._inserted_at,
    }
    return Captured(fields, arrays, store._index)


def restore(
    store_class: type[KNNStore],
    fields: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    index: Path | np.ndarray,
    source: str,
    where: Callable[[str], str],
) -> KNNStore:
    """Rebuild a store from what :func:`capture` took apart, checking every field and array.

    Args:
        fields: the :class:`Captured` fields (other keys, such as ``format_version``, are ignored).
        arrays: every ``ARRAY_FILES`` name → its array; used as they are (memory maps stay mapped).
        index: the index file, or its bytes as a 1-D ``uint8`` array.
        source: names the origin of ``fields`` in errors.
        where: names the origin (file or checkpoint key) of an array or of ``"index_bytes"`` in errors.
    Raises:
        MemoryStoreError: naming the field, the array or the index that is wrong.
    """
    _check_fields(fields, source)
    store = store_class.__new__(store_class)
    try:
        store._configure(
            fields["key_dim"],
            fields["value_dim"],
            fields["capacity"],
            fields["metric"],
            fields["lrfu_lambda"],
            fields["value_dtype"],
            fields["eviction"],
        )
    except ValueError as error:
        raise MemoryStoreError(f"{source}: {error}") from error
    capacity = store.capacity
    expected = {
        "keys": ((capacity, store.key_dim), np.float32),
        "values": ((capacity, store.value_dim), np.dtype(store.value_dtype)),
        "live": ((capacity,), np.bool_),
        "lrfu_crf": ((capacity,), np.float64),
        "lrfu_last": ((capacity,), np.int64),
        "inserted_at": ((capacity,), np.int64),
    }
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if array.shape != shape or array.dtype != dtype:
            raise MemoryStoreError(
                f"{where(name)}: expected shape {shape} dtype {np.dtype(dtype).name} (from {source}), "
                f"got shape {array.shape} dtype {array.dtype.name}"
            )
    live = arrays["live"]
    if int(np.count_nonzero(live)) != fields["entries"]:
        raise MemoryStoreError(
            f"{where('live')}: {np.count_nonzero(live)} live entries, {source} says {fields['entries']}"
        )
    if isinstance(index, np.ndarray) and (index.ndim != 1 or index.dtype != np.uint8):
        raise MemoryStoreError(
            f"{where('index_bytes')}: expected a 1-D uint8 array, "
            f"got shape {index.shape} dtype {index.dtype.name}"
        )
    store._keys, store._values, store._live = arrays["keys"], arrays["values"], live.copy()
    store._inserted_at = arrays["inserted_at"].copy()
    store._lrfu.load_state_dict(
        {"crf": arrays["lrfu_crf"], "last": arrays["lrfu_last"], "lam": store.lrfu_lambda}
    )
    try:
        store._index = load_index(
            index, store.key_dim, store.metric, capacity, live=live, **fields["index_params"]
        )
    except (RuntimeError, ValueError) as error:  # hnswlib reports a corrupt graph as RuntimeError
        raise MemoryStoreError(f"{where('index_bytes')}: not a usable key index ({error})") from error
    store._now = int(fields["now"])
    store._stats = MemoryStats(**{name: int(count) for name, count in fields["stats"].items()})
    return store


# ---------------------------------------------------------------------- directory


def save(store: KNNStore, directory: str | Path) -> None:
    """Atomically write ``store`` to ``directory``: ``manifest.json``, one ``.npy`` per array and
    ``index.bin``, with the size and SHA-256 of every file recorded in the manifest.

    Everything is written and fsynced in a temporary sibling of ``directory`` that then replaces it
    (:func:`dmt.memory.integrity.write_directory`): a failed save (full disk, crash) leaves the
    previous store loadable and no temporary directory behind. An existing ``directory`` holding
    files that are not part of a store is refused rather than deleted.

    A store loaded with ``mmap=True`` follows its latest save: its values are then mapped from the
    new ``directory/values.npy`` (the file it was loaded from may just have been deleted), so later
    value writes land there. The mapping follows the file if ``directory`` is moved afterwards.

    Raises:
        OSError: naming ``directory`` when writing fails; the original error is the cause.
    """
    directory = Path(directory)
    captured = capture(store)

    def write_files(staging: Path) -> None:
        """Every file into the empty ``staging`` directory, the manifest with their records last."""
        files = {
            ARRAY_FILES[name]: write_array(staging / ARRAY_FILES[name], array)
            for name, array in captured.arrays.items()
        }
        index_path = staging / INDEX_FILE
        captured.index.save(index_path)
        fsync_path(index_path)
        files[INDEX_FILE] = file_record(index_path)
        manifest = {"format_version": DIRECTORY_FORMAT_VERSION, **captured.fields, "files": files}
        manifest_path = staging / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2))
        fsync_path(manifest_path)

    write_directory(directory, write_files, known_names=(MANIFEST, *STORE_FILES.values()))
    if isinstance(store._values, np.memmap):
        store._values = _load_npy(directory / ARRAY_FILES["values"], mmap=True)


def load(store_class: type[KNNStore], directory: str | Path, mmap: bool, verify: bool) -> KNNStore:
    """Read a :func:`save` directory (never unpickles), checking it against its manifest.

    Every file's size is always compared with the manifest, and shapes, dtypes and the live count
    with the manifest's fields. ``verify`` also hashes every file: one extra full read of the store
    (about a second per GB). ``verify=False`` skips only that pass, for huge stores on trusted disks;
    a corruption that keeps a file's size then goes unnoticed.

    With ``mmap`` the values stay in ``values.npy`` and are memory-mapped read/write, so a store may
    exceed RAM; every later value write (``insert``, ``update_values``, ``recombine``) goes straight
    to that file. The file then no longer matches its checksum until the next :func:`save`: if the
    process stops before that, the directory loads only with ``verify=False``.

    Raises:
        FileNotFoundError: ``directory`` has no ``manifest.json``.
        MemoryStoreError: a ``ValueError`` naming the file that is unreadable, missing, truncated,
            changed, of another ``format_version`` or inconsistent with the manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_version(manifest, DIRECTORY_FORMAT_VERSION, source=str(directory / MANIFEST))
    verify_files(directory, manifest.get("files"), STORE_FILES.values(), checksums=verify)
    arrays = {
        name: _load_npy(directory / file, mmap=mmap and name == "values")
        for name, file in ARRAY_FILES.items()
    }
    return restore(
        store_class,
        manifest,
        arrays,
        directory / INDEX_FILE,
        source=str(directory / MANIFEST),
        where=lambda name: str(directory / STORE_FILES[name]),
    )


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """The array saved at ``path`` (never unpickled); memory-mapped read/write with ``mmap``."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r+" if mmap else None)
    except (OSError, ValueError, EOFError) as error:
        raise MemoryStoreError(f"{path}: not a readable .npy array ({error})") from error


# ---------------------------------------------------------------------- checkpoint


def state_dict(store: KNNStore) -> dict[str, Any]:
    """``store`` as a plain dict of numpy arrays, ints, floats, strings and dicts of those.

    The fields, a copy of every array (never a memory map) and the key index file (e.g. the hnswlib
    graph) as a ``uint8`` array ``index_bytes``, so loading does not rebuild the index. To pass
    ``torch.load(weights_only=True)`` the caller converts the arrays with ``torch.from_numpy`` (and back
    with ``.numpy()``); this dict stays numpy-only.
    """
    captured = capture(store)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        **captured.fields,
        **{name: np.array(array) for name, array in captured.arrays.items()},
        "index_bytes": captured.index.to_bytes(),
    }


def from_state_dict(store_class: type[KNNStore], state: Mapping[str, Any]) -> KNNStore:
    """Inverse of :func:`state_dict`; arrays may be anything ``np.asarray`` accepts.

    Raises:
        MemoryStoreError: a ``ValueError`` naming the entry that is missing or of the wrong version,
            type, shape or dtype.
    """
    if not isinstance(state, Mapping):
        raise MemoryStoreError(f"state_dict: expected a mapping, got {type(state).__name__}")
    _check_version(state, CHECKPOINT_FORMAT_VERSION, source="state_dict")
    arrays = {name: _state_array(state, name) for name in STORE_FILES}
    index_bytes = arrays.pop("index_bytes")
    return restore(
        store_class,
        state,
        arrays,
        index_bytes,
        source="state_dict",
        where=lambda name: f"state_dict[{name!r}]",
    )


def _state_array(state: Mapping[str, Any], name: str) -> np.ndarray:
    """``state[name]`` as a numpy array, naming the entry if it is missing or not array-like."""
    if name not in state:
        raise MemoryStoreError(f"state_dict: missing entry {name!r}")
    try:
        return np.asarray(state[name])
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise MemoryStoreError(f"state_dict[{name!r}]: not an array ({error})") from error


# ---------------------------------------------------------------------- checks shared by both


def _check_version(container: Mapping[str, Any], expected: int, source: str) -> None:
    """Only the current layout of each container is read: no older one is converted."""
    version = container.get("format_version")
    if type(version) is not int or version != expected:
        raise MemoryStoreError(f"{source}: format_version {version!r} is not supported (expected {expected})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_fields(fields: Mapping[str, Any], source: str) -> None:
    """Presence and types of the fields; their values are checked by ``KNNStore._configure`` and
    against the arrays."""
    for name, kind in _FIELDS.items():
        if name not in fields:
            raise MemoryStoreError(f"{source}: missing field {name!r}")
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MemoryStoreError(f"{source}: field {name!r} has the wrong type ({value!r})")
    backend = fields["index_params"].get("backend", "hnsw")
    if backend not in ("hnsw", "exact", "product"):
        raise MemoryStoreError(f"{source}: field 'index_params' names an unknown backend {backend!r}")
    for name, (allowed, nullable) in _COUNTER_FIELDS.items():
        counters = {k: v for k, v in fields[name].items() if k != "backend"}
        valid = all(_is_int(v) or (v is None and k in nullable) for k, v in counters.items())
        if not set(counters) <= set(allowed) or not valid:
            also = f" ({', '.join(nullable)} also to null)" if nullable else ""
            raise MemoryStoreError(
                f"{source}: field {name!r} must map some of {', '.join(allowed)} to integers{also}, "
                f"got {dict(counters)!r}"
            )
    if fields["now"] < 0:
        raise MemoryStoreError(f"{source}: field 'now' must be >= 0, got {fields['now']}")
