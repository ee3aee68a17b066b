"""A ``KNNStore`` on disk and in a checkpoint: one capture, one restore, two containers.

:func:`capture` takes a store apart into its *fields* (settings, entry count, clock, counters: JSON-able
scalars and dicts), its arrays and its key index; :func:`restore` puts one back together and checks every
field and array against the others, so a container only has to deliver the pieces.

Arrays are kept up to the store's high-water mark ``H`` (highest live slot + 1, 0 when empty): rows
``0 .. H-1`` of every per-slot array, so a large store holding few entries is saved at its live size
(``capacity`` is a field). The arrays, by name (file ``<name>.npy``), with ``S = ORIGIN_SPAN``:

- ``keys (H, key_dim)`` float32 and ``values (H, value_dim)`` in ``value_dtype``;
- ``live (H,)`` bool: which rows hold an entry (rows of merged-away entries are holes);
- ``lrfu_crf (H,)`` float64 and ``lrfu_last (H,)`` int64: the LRFU state (:class:`dmt.memory.lrfu.LRFU`);
- ``inserted_at (H,)`` int64 and ``read_count (H,)`` int64: the clock at insertion, references since;
- ``origin_unit (H,)`` int32 and ``origin_tokens (H, S)`` int32: each entry's origin, -1 where unknown.

Restoring keeps keys and values as loaded (``H`` rows; the store grows them on its first insert beyond) and
pads the other arrays to ``capacity`` with the state of an empty slot. The key index is saved only when it
holds something beyond the keys (``KeyIndex.has_file``: the hnsw graph, the product sub-key tables); the
exact index is rebuilt from the keys and the live mask. An hnsw graph of an ``ip`` or ``l2`` store holds
the keys exactly (:func:`index_holds_keys`), so its keys are saved there only and read back from it
(``cosine`` graphs hold them normalised, so those stores also save ``keys``). The containers:

- a **directory** (:func:`save` / :func:`load`, for exports): ``manifest.json`` (the fields plus the size
  and SHA-256 of every other file), one ``.npy`` per array and, for indexes with a file, ``index.bin``. It
  is written atomically and verified with :mod:`dmt.memory.integrity`, and its keys and values may stay
  memory-mapped, so a store can exceed RAM;
- a **checkpoint** dict (:func:`state_dict` / :func:`from_state_dict`, inside training checkpoints): the
  fields, the arrays and, for indexes with a file, its bytes as a ``uint8`` array ``index_bytes``; numpy
  only, never pickled objects.

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

from dmt.files import check_directory_target, fsync_path, write_directory
from dmt.memory.backends import BACKENDS, INDEX_PARAMS, index_class, load_index, make_index
from dmt.memory.base import MemoryStats
from dmt.memory.index import KeyIndex
from dmt.memory.integrity import (
    MANIFEST,
    MemoryStoreError,
    file_record,
    read_manifest,
    verify_files,
    write_array,
)
from dmt.remote_code.hnsw_file import read_hnsw_vectors

if TYPE_CHECKING:
    from dmt.memory.store import KNNStore

# Each container has its own version, raised whenever its layout changes: only the current layout is read
# (_check_version), so a store in another one is refused by name instead of misread. The current layouts
# hold the integrity records (directories), the eviction policy, insertion times, `reads` counter, read
# counts and origins, keep arrays at the high-water mark rather than the capacity, and save no exact index.
DIRECTORY_FORMAT_VERSION = 4
CHECKPOINT_FORMAT_VERSION = 3
INDEX_FILE = "index.bin"
# Array name → file name in a directory; the names are also the keys of a checkpoint dict.
ARRAY_FILES = {
    "keys": "keys.npy",
    "values": "values.npy",
    "live": "live.npy",
    "lrfu_crf": "lrfu_crf.npy",
    "lrfu_last": "lrfu_last.npy",
    "inserted_at": "inserted_at.npy",
    "read_count": "read_count.npy",
    "origin_unit": "origin_unit.npy",
    "origin_tokens": "origin_tokens.npy",
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
    "index_params": (INDEX_PARAMS, ("ef_search",)),
}


class Captured(NamedTuple):
    """A store taken apart: what both containers hold, each in its own form."""

    fields: dict[str, Any]  # the _FIELDS: settings, entry count, LRFU clock, counters
    arrays: dict[str, np.ndarray]  # every ARRAY_FILES name → rows 0 .. H-1 of the store's array (a view)
    index: KeyIndex  # written as the index file, or as that file's bytes, if it has one


def _slot_arrays(store: KNNStore) -> dict[str, np.ndarray]:
    """The store's own per-slot bookkeeping, ``capacity`` rows each, by ``ARRAY_FILES`` name (all but
    keys and values)."""
    return {
        "live": store._live,
        "lrfu_crf": store._lrfu.crf,
        "lrfu_last": store._lrfu.last,
        "inserted_at": store._inserted_at,
        "read_count": store._read_count,
        "origin_unit": store._origin_unit,
        "origin_tokens": store._origin_tokens,
    }


def high_water_mark(live: np.ndarray) -> int:
    """``H``: the highest live slot of the ``live (C,)`` mask + 1, or 0 when none is live."""
    live_slots = np.flatnonzero(live)
    return int(live_slots[-1]) + 1 if len(live_slots) else 0


def capture(store: KNNStore) -> Captured:
    """``store`` as fields, arrays (up to its high-water mark) and key index, for a container to write."""
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
    rows = high_water_mark(store._live)
    arrays = {"keys": store._keys, "values": store._values, **_slot_arrays(store)}
    return Captured(fields, {name: arrays[name][:rows] for name in saved_arrays(fields)}, store._index)


def index_has_file(fields: Mapping[str, Any]) -> bool:
    """Whether the index that checked ``fields`` name is saved (an index file, or ``index_bytes``)."""
    return index_class(fields["index_params"].get("backend", "hnsw")).has_file


def index_holds_keys(fields: Mapping[str, Any]) -> bool:
    """Whether the saved index of checked ``fields`` holds the keys as they are (an hnsw graph of an ip or
    l2 store), so that ``keys`` is not saved beside it."""
    return fields["index_params"].get("backend", "hnsw") == "hnsw" and fields["metric"] != "cosine"


def saved_arrays(fields: Mapping[str, Any]) -> list[str]:
    """The ``ARRAY_FILES`` names a container of a store with checked ``fields`` holds."""
    return [name for name in ARRAY_FILES if not (name == "keys" and index_holds_keys(fields))]


def keys_from_index(index: Path | np.ndarray, live: np.ndarray, key_dim: int, where: str) -> np.ndarray:
    """``(H, key_dim)`` keys of the ``live (H,)`` rows, read from an hnsw index file (or its bytes)."""
    try:
        labels, vectors = read_hnsw_vectors(index, key_dim)
    except ValueError as error:
        raise MemoryStoreError(f"{where}: {error}") from error
    keys = np.zeros((len(live), key_dim), dtype=np.float32)
    stored = np.zeros(len(live), dtype=bool)
    inside = labels < len(live)
    keys[labels[inside]], stored[labels[inside]] = vectors[inside], True
    if (live & ~stored).any():
        raise MemoryStoreError(f"{where}: the graph lacks keys of live entries")
    return keys


def restore(
    store_class: type[KNNStore],
    fields: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    index: Path | np.ndarray | None,
    source: str,
    where: Callable[[str], str],
) -> KNNStore:
    """Rebuild a store from what :func:`capture` took apart, checking every array against the fields.

    Args:
        fields: the :class:`Captured` fields, already checked by :func:`check_fields` (other keys, such as
            ``format_version``, are ignored).
        arrays: every ``ARRAY_FILES`` name → its array of ``H <= capacity`` rows; keys and values are used
            as they are (memory maps stay mapped), the others copied into arrays of ``capacity`` rows.
        index: the index file, or its bytes as a 1-D ``uint8`` array; None for an index without a file
            (:func:`index_has_file`), which is rebuilt from the keys.
        source: names the origin of ``fields`` in errors.
        where: names the origin (file or checkpoint key) of an array or of ``"index_bytes"`` in errors.
    Raises:
        MemoryStoreError: naming the field, the array or the index that is wrong.
    """
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
    if index_holds_keys(fields) and index is not None:
        arrays = {
            **arrays,
            "keys": keys_from_index(index, arrays["live"], store.key_dim, where("index_bytes")),
        }
    rows = _check_arrays(store, fields, arrays, source, where)
    store._keys, store._values = arrays["keys"], arrays["values"]
    for name, array in _slot_arrays(store).items():  # an empty store's bookkeeping, from _configure
        array[:rows] = arrays[name]
    store._index = _restore_index(store, fields["index_params"], index, where)
    store._now = int(fields["now"])
    store._stats = MemoryStats(**{name: int(count) for name, count in fields["stats"].items()})
    return store


def _check_arrays(
    store: KNNStore,
    fields: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    source: str,
    where: Callable[[str], str],
) -> int:
    """Check every array's shape and dtype against the freshly configured ``store`` and the live count
    against ``fields``; returns their row count ``H``."""
    live = arrays["live"]
    if live.ndim != 1 or live.dtype != np.bool_ or len(live) > store.capacity:
        raise MemoryStoreError(
            f"{where('live')}: expected shape (H,) with H <= capacity {store.capacity} dtype bool "
            f"(from {source}), got shape {live.shape} dtype {live.dtype.name}"
        )
    if int(np.count_nonzero(live)) != fields["entries"]:
        raise MemoryStoreError(
            f"{where('live')}: {np.count_nonzero(live)} live entries, {source} says {fields['entries']}"
        )
    rows = len(live)
    expected = {
        "keys": ((rows, store.key_dim), np.dtype(np.float32)),
        "values": ((rows, store.value_dim), np.dtype(store.value_dtype)),
        **{name: ((rows, *array.shape[1:]), array.dtype) for name, array in _slot_arrays(store).items()},
    }
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if array.shape != shape or array.dtype != dtype:
            raise MemoryStoreError(
                f"{where(name)}: expected shape {shape} dtype {dtype.name} (from {source} and "
                f"{where('live')}), got shape {array.shape} dtype {array.dtype.name}"
            )
    return rows


def _restore_index(
    store: KNNStore, params: Mapping[str, Any], index: Path | np.ndarray | None, where: Callable[[str], str]
) -> KeyIndex:
    """The key index of ``store`` (keys and live mask already restored): read from ``index`` (a file or
    its bytes), or rebuilt from the live keys when the index has no file (``index`` None)."""
    if index is None:
        rebuilt = make_index(store.key_dim, store.metric, store.capacity, **params)
        live = np.flatnonzero(store._live)
        # Without holes the keys go in as a view of the (possibly memory-mapped) array, not a copy.
        keys = store._keys[: len(live)] if len(live) == high_water_mark(store._live) else store._keys[live]
        rebuilt.add(live, keys)
        return rebuilt
    if isinstance(index, np.ndarray) and (index.ndim != 1 or index.dtype != np.uint8):
        raise MemoryStoreError(
            f"{where('index_bytes')}: expected a 1-D uint8 array, "
            f"got shape {index.shape} dtype {index.dtype.name}"
        )
    try:
        return load_index(index, store.key_dim, store.metric, store.capacity, live=store._live, **params)
    except (RuntimeError, ValueError) as error:  # hnswlib reports a corrupt graph as RuntimeError
        raise MemoryStoreError(f"{where('index_bytes')}: not a usable key index ({error})") from error


# ---------------------------------------------------------------------- directory


def is_store_directory(directory: Path) -> bool:
    """Whether ``directory`` holds a saved store, or only files a store is made of (an interrupted save)."""
    names = {path.name for path in directory.iterdir()}
    return MANIFEST in names or names <= {MANIFEST, *STORE_FILES.values()}


def save(store: KNNStore, directory: str | Path) -> None:
    """Atomically write ``store`` to ``directory``: ``manifest.json``, one ``.npy`` per array and, for an
    index with a file, ``index.bin``, with the size and SHA-256 of every file recorded in the manifest.

    Everything is written and fsynced in a temporary sibling of ``directory`` that then replaces it
    (:func:`dmt.files.write_directory`): a failed save (full disk, crash) leaves the
    previous store loadable and no temporary directory behind. An existing ``directory`` holding
    files that are not part of a store is refused rather than deleted.

    A store whose keys and values are memory-mapped (loaded with ``mmap=True``, not grown since) follows
    its latest save: they are then mapped from the new ``directory`` (the files it was loaded from may
    just have been deleted), so later writes land there. The mapping follows the files if ``directory``
    is moved afterwards.

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
        if captured.index.has_file:
            index_path = staging / INDEX_FILE
            captured.index.save(index_path)
            fsync_path(index_path)
            files[INDEX_FILE] = file_record(index_path)
        manifest = {"format_version": DIRECTORY_FORMAT_VERSION, **captured.fields, "files": files}
        manifest_path = staging / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2))
        fsync_path(manifest_path)

    check_directory_target(directory, is_store_directory, "memory store")
    write_directory(directory, write_files)
    if isinstance(store._keys, np.memmap) and "keys" in captured.arrays:
        store._keys = _load_npy(directory / ARRAY_FILES["keys"], mmap=True)
    if isinstance(store._values, np.memmap):
        store._values = _load_npy(directory / ARRAY_FILES["values"], mmap=True)


def load(store_class: type[KNNStore], directory: str | Path, mmap: bool, verify: bool) -> KNNStore:
    """Read a :func:`save` directory (never unpickles), checking it against its manifest.

    Every file's size is always compared with the manifest, and shapes, dtypes and the live count
    with the manifest's fields. ``verify`` also hashes every file: one extra full read of the store
    (about a second per GB). ``verify=False`` skips only that pass, for huge stores on trusted disks;
    a corruption that keeps a file's size then goes unnoticed.

    With ``mmap`` the keys and values stay in ``keys.npy`` and ``values.npy`` and are memory-mapped
    read/write, so a store may exceed RAM; every later key or value write (``insert``, ``update_values``,
    ``recombine``) goes straight to those files, until an insert needs a slot beyond the saved rows and
    the store grows into memory. The files then no longer match their checksums until the next
    :func:`save`: if the process stops before that, the directory loads only with ``verify=False``.

    Raises:
        FileNotFoundError: ``directory`` has no ``manifest.json``.
        MemoryStoreError: a ``ValueError`` naming the file that is unreadable, missing, truncated,
            changed, of another ``format_version`` or inconsistent with the manifest.
    """
    directory = Path(directory)
    source = str(directory / MANIFEST)
    manifest = read_manifest(directory)
    _check_version(manifest, DIRECTORY_FORMAT_VERSION, source=source)
    check_fields(manifest, source)
    has_file = index_has_file(manifest)
    names = saved_arrays(manifest)
    required = [*(ARRAY_FILES[name] for name in names), *([INDEX_FILE] if has_file else [])]
    verify_files(directory, manifest.get("files"), required, checksums=verify)
    arrays = {
        name: _load_npy(directory / ARRAY_FILES[name], mmap=mmap and name in ("keys", "values"))
        for name in names
    }
    return restore(
        store_class,
        manifest,
        arrays,
        directory / INDEX_FILE if has_file else None,
        source=source,
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

    The fields, a copy of every array (never a memory map) and, for an index with a file (e.g. the
    hnswlib graph), that file as a ``uint8`` array ``index_bytes``, so loading does not rebuild the
    graph. To pass ``torch.load(weights_only=True)`` the caller converts the arrays with
    ``torch.from_numpy`` (and back with ``.numpy()``); this dict stays numpy-only.
    """
    captured = capture(store)
    state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        **captured.fields,
        **{name: np.array(array) for name, array in captured.arrays.items()},
    }
    if captured.index.has_file:
        state["index_bytes"] = captured.index.to_bytes()
    return state


def from_state_dict(store_class: type[KNNStore], state: Mapping[str, Any]) -> KNNStore:
    """Inverse of :func:`state_dict`; arrays may be anything ``np.asarray`` accepts.

    Raises:
        MemoryStoreError: a ``ValueError`` naming the entry that is missing or of the wrong version,
            type, shape or dtype.
    """
    if not isinstance(state, Mapping):
        raise MemoryStoreError(f"state_dict: expected a mapping, got {type(state).__name__}")
    _check_version(state, CHECKPOINT_FORMAT_VERSION, source="state_dict")
    check_fields(state, "state_dict")
    arrays = {name: _state_array(state, name) for name in saved_arrays(state)}
    return restore(
        store_class,
        state,
        arrays,
        _state_array(state, "index_bytes") if index_has_file(state) else None,
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


def check_fields(fields: Mapping[str, Any], source: str) -> None:
    """Presence and types of the fields; their values are checked by ``KNNStore._configure`` and
    against the arrays."""
    for name, kind in _FIELDS.items():
        if name not in fields:
            raise MemoryStoreError(f"{source}: missing field {name!r}")
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MemoryStoreError(f"{source}: field {name!r} has the wrong type ({value!r})")
    backend = fields["index_params"].get("backend", "hnsw")
    if backend == "auto" or backend not in BACKENDS:
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
