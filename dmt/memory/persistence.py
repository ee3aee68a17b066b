"""A ``KNNStore`` on disk and in a checkpoint: two containers of what :mod:`dmt.memory.snapshot` captures
(fields, arrays up to the high-water mark, key index) and restores.

- a **directory** (:func:`save` / :func:`load`, for exports): ``manifest.json`` (the fields plus the size
  and SHA-256 of every other file), one ``.npy`` per array and, for indexes with a file, ``index.bin``. It
  is written atomically and verified with :mod:`dmt.kernel.store_files`, and its keys and values may stay
  memory-mapped, so a store can exceed RAM;
- a **checkpoint** dict (:func:`state_dict` / :func:`from_state_dict`, inside training checkpoints): the
  fields, the arrays and, for indexes with a file, its bytes as a ``uint8`` array ``index_bytes``; numpy
  only, never pickled objects. It has no version of its own: the checkpoint that holds it has one
  (:mod:`dmt.model.checkpoint`).

The directory's version is :data:`dmt.kernel.store_files.DIRECTORY_FORMAT_VERSION`, raised whenever its
layout changes: only the current layout is read, so a store in another one is refused by name instead of
misread.

``KNNStore``'s own ``save``/``load``/``state_dict``/``from_state_dict`` only delegate here; this module
reads and builds stores through their public state only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dmt.files import check_directory_target, fsync_path, write_directory
from dmt.kernel.store_files import (
    DIRECTORY_FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    check_version,
    file_record,
    read_manifest,
    verify_files,
)
from dmt.memory.integrity import MemoryStoreError, store_errors, write_array
from dmt.memory.snapshot import ARRAY_NAMES, capture, check_fields, index_has_file, restore, saved_arrays
from dmt.memory.state import LATER_SLOT_ARRAYS
from dmt.memory.store import KNNStore

# Array name → file name in a directory; the names are also the keys of a checkpoint dict.
ARRAY_FILES = {name: f"{name}.npy" for name in ARRAY_NAMES}
# Every file of a directory but the manifest, by the name a checkpoint dict gives its content.
STORE_FILES = {**ARRAY_FILES, "index_bytes": INDEX_FILE}


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
    just have been deleted), so the pages its writes had copied into memory are given back. The mapping
    follows the files if ``directory`` is moved afterwards.

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
    state = store.state()
    if isinstance(state.keys, np.memmap) and "keys" in captured.arrays:
        store.replace_arrays(keys=_load_npy(directory / ARRAY_FILES["keys"], mmap=True))
    if isinstance(state.values, np.memmap):
        store.replace_arrays(values=_load_npy(directory / ARRAY_FILES["values"], mmap=True))


def load(store_class: type[KNNStore], directory: str | Path, mmap: bool, verify: bool) -> KNNStore:
    """Read a :func:`save` directory (never unpickles), checking it against its manifest.

    Every file's size is always compared with the manifest, and shapes, dtypes and the live count
    with the manifest's fields. ``verify`` also hashes every file: one extra full read of the store
    (about a second per GB). ``verify=False`` skips only that pass, for huge stores on trusted disks;
    a corruption that keeps a file's size then goes unnoticed.

    With ``mmap`` the keys and values stay in ``keys.npy`` and ``values.npy`` and are memory-mapped
    copy-on-write, so a store may exceed RAM and the files are never changed: a later key or value write
    (``insert``, ``update_values``, ``recombine``) copies the pages it touches into this process's memory
    (and an insert beyond the saved rows moves the store into memory). What was written stays in memory
    until :func:`save` writes a directory, this one included; the directory loaded from still verifies.

    Raises:
        FileNotFoundError: ``directory`` has no ``manifest.json``.
        MemoryStoreError: a ``ValueError`` naming the file that is unreadable, missing, truncated,
            changed, of another ``format_version`` or inconsistent with the manifest.
    """
    directory = Path(directory)
    source = str(directory / MANIFEST)
    with store_errors():
        manifest = read_manifest(directory)
        check_version(manifest, DIRECTORY_FORMAT_VERSION, source=source)
    check_fields(manifest, source)
    has_file = index_has_file(manifest)
    records = manifest.get("files")
    names = [  # a store saved before a later per-slot array existed has no file of it
        name
        for name in saved_arrays(manifest)
        if name not in LATER_SLOT_ARRAYS or not isinstance(records, dict) or ARRAY_FILES[name] in records
    ]
    required = [*(ARRAY_FILES[name] for name in names), *([INDEX_FILE] if has_file else [])]
    with store_errors():
        verify_files(directory, records, required, checksums=verify)
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
    """The array saved at ``path`` (never unpickled); memory-mapped copy-on-write with ``mmap``."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="c" if mmap else None)
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
        **captured.fields,
        **{name: np.array(array) for name, array in captured.arrays.items()},
    }
    if captured.index.has_file:
        state["index_bytes"] = captured.index.to_bytes()
    return state


def from_state_dict(store_class: type[KNNStore], state: Mapping[str, Any]) -> KNNStore:
    """Inverse of :func:`state_dict`; arrays may be anything ``np.asarray`` accepts.

    Raises:
        MemoryStoreError: a ``ValueError`` naming the entry that is missing or of the wrong
            type, shape or dtype.
    """
    if not isinstance(state, Mapping):
        raise MemoryStoreError(f"state_dict: expected a mapping, got {type(state).__name__}")
    check_fields(state, "state_dict")
    arrays = {
        name: _state_array(state, name)
        for name in saved_arrays(state)
        if name not in LATER_SLOT_ARRAYS or name in state
    }
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
