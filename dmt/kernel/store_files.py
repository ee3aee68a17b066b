"""Reading a saved memory store's files in numpy and torch alone: the manifest, its integrity records,
and the keys an hnswlib graph holds.

A saved store (:mod:`dmt.memory.persistence` writes it) is a directory whose ``manifest.json`` holds its
settings, its ``format_version`` and, for every other file, the size in bytes and the SHA-256
(``{"files": {name: {"bytes": int, "sha256": hex}}}``); arrays are ``.npy`` files read without pickle. A
store whose hnsw graph holds its keys exactly (``ip`` and ``l2``; hnswlib normalises ``cosine`` vectors)
saves them only there, in ``index.bin``: :func:`read_hnsw_vectors` reads them back without hnswlib, in
hnswlib's ``saveIndex`` layout (0.7, 0.8): a 96-byte header, then one level-0 record per stored element,
``[links | vector | label]``. ``dmt.memory`` restores whole stores with these checks; an exported student
reads its entries with :func:`read_store`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The store directory layout this code reads; raised whenever it changes (no other layout is read).
DIRECTORY_FORMAT_VERSION = 4
MANIFEST = "manifest.json"
INDEX_FILE = "index.bin"
_CHUNK = 1 << 20  # bytes per read while hashing: bounded memory for stores larger than RAM

FileRecord = dict[str, Any]  # {"bytes": int, "sha256": str}


class StoreFileError(ValueError):
    """A saved store's file is malformed, truncated, corrupt or disagrees with its manifest."""


def file_record(path: Path) -> FileRecord:
    """Size and SHA-256 of the file at ``path``, read in bounded chunks."""
    sha256, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            sha256.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha256.hexdigest()}


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of ``directory``.

    Raises:
        FileNotFoundError: there is no manifest (not a saved store).
        StoreFileError: the manifest is not UTF-8 JSON or not a JSON object.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (not a saved KNNStore, or an interrupted save)")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both derive from ValueError
        raise StoreFileError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise StoreFileError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def check_version(container: Any, expected: int, source: str) -> None:
    """Only the current layout of a container is read: no older one is converted."""
    version = container.get("format_version") if isinstance(container, dict) else None
    if type(version) is not int or version != expected:
        raise StoreFileError(f"{source}: format_version {version!r} is not supported (expected {expected})")


def _check_record(manifest: Path, name: Any, record: Any) -> None:
    """Reject records that could not have been written by :func:`file_record` or dmt's array writer."""
    # A name such as "../x" would make verification read outside the store directory.
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise StoreFileError(f"{manifest}: file name {name!r} is not a plain file name")
    valid = (
        isinstance(record, dict)
        and type(record.get("bytes")) is int
        and record["bytes"] >= 0
        and isinstance(record.get("sha256"), str)
        and len(record["sha256"]) == 64
    )
    if not valid:
        raise StoreFileError(f"{manifest}: malformed integrity record for {name}: {record!r}")


def verify_files(directory: Path, records: Any, required: Collection[str], checksums: bool = True) -> None:
    """Check every file listed in ``records`` (the manifest's ``files``) against ``directory``.

    Sizes are always compared (one ``stat`` per file); with ``checksums`` every file is also read once
    and hashed, which costs a full pass over the store (SHA-256 on one core).

    Raises:
        StoreFileError: naming the file that is unlisted, missing, of the wrong size or changed.
    """
    manifest = directory / MANIFEST
    if not isinstance(records, dict):
        raise StoreFileError(f"{manifest}: 'files' must map file names to integrity records")
    for name in required:
        if name not in records:
            raise StoreFileError(f"{manifest}: no integrity record for {name}")
    for name, record in records.items():
        _check_record(manifest, name, record)
        path = directory / name
        if not path.is_file():
            raise StoreFileError(f"{path}: missing (listed in {MANIFEST})")
        size, expected = path.stat().st_size, record["bytes"]
        if size != expected:
            hint = "truncated?" if size < expected else "appended to or replaced?"
            raise StoreFileError(f"{path}: size {size} bytes, {MANIFEST} says {expected} ({hint})")
        if checksums and file_record(path)["sha256"] != record["sha256"]:
            raise StoreFileError(f"{path}: checksum mismatch (file changed or corrupt)")


# hnswlib's saveIndex header, in order (size_t fields are uint64, maxlevel int32, enterpoint uint32).
HEADER = np.dtype(
    [
        ("offset_level0", "<u8"),
        ("max_elements", "<u8"),
        ("element_count", "<u8"),
        ("size_per_element", "<u8"),
        ("label_offset", "<u8"),
        ("data_offset", "<u8"),
        ("max_level", "<i4"),
        ("enter_point", "<u4"),
        ("max_m", "<u8"),
        ("max_m0", "<u8"),
        ("m", "<u8"),
        ("mult", "<f8"),
        ("ef_construction", "<u8"),
    ]
)


def read_hnsw_vectors(
    path: str | Path | np.ndarray, dim: int, where: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(E,)`` int64 and float32 vectors ``(E, dim)`` of every element stored in the hnswlib index
    file ``path`` (or its bytes, a ``uint8`` array); deleted ones included, their deletion mark is not
    read. ``StoreFileError`` naming ``where`` (by default ``path``) when it is not such an index of
    ``dim``-wide vectors."""
    data = path if isinstance(path, np.ndarray) else np.fromfile(path, dtype=np.uint8)
    path = where or ("index bytes" if isinstance(path, np.ndarray) else path)
    if len(data) < HEADER.itemsize:
        raise StoreFileError(f"{path}: too short for an hnswlib index")
    header = data[: HEADER.itemsize].view(HEADER)[0]
    count, size = int(header["element_count"]), int(header["size_per_element"])
    data_offset, label_offset = int(header["data_offset"]), int(header["label_offset"])
    body = data[HEADER.itemsize : HEADER.itemsize + count * size]
    if len(body) != count * size or label_offset + 8 > size or data_offset + 4 * dim > label_offset:
        raise StoreFileError(
            f"{path}: not an hnswlib index of {dim}-wide vectors ({count} records of {size} bytes)"
        )
    records = body.reshape(count, size)
    vectors = records[:, data_offset : data_offset + 4 * dim].copy().view("<f4")  # (E, dim)
    labels = records[:, label_offset : label_offset + 8].copy().view("<u8")[:, 0].astype(np.int64)  # (E,)
    return labels, vectors


def keys_from_hnsw(index: Path | np.ndarray, live: np.ndarray, key_dim: int, where: str) -> np.ndarray:
    """``(H, key_dim)`` keys of the ``live (H,)`` rows, read from an hnsw index file (or its bytes).

    Raises:
        StoreFileError: naming ``where`` when it is not such an index or lacks a live row's key.
    """
    labels, vectors = read_hnsw_vectors(index, key_dim, where)
    keys = np.zeros((len(live), key_dim), dtype=np.float32)
    stored = np.zeros(len(live), dtype=bool)
    inside = (labels >= 0) & (labels < len(live))  # a label read as int64 may be negative
    keys[labels[inside]], stored[labels[inside]] = vectors[inside], True
    if (live & ~stored).any():
        raise StoreFileError(f"{where}: the graph lacks keys of live entries")
    return keys


def read_store(
    directory: Path, key_dim: int, entry_dim: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keys (H, Dk)``, ``entries (H, E)`` and ``live (H,)`` of the store saved in ``directory``, checked
    against its manifest (version, metric, every file's size and SHA-256, shapes). Keys and entries are
    memory-mapped copy-on-write where the files hold them.

    Raises:
        FileNotFoundError: there is no manifest.
        StoreFileError: naming the file that is missing, changed or of another shape or layout.
    """
    manifest = read_manifest(directory)
    source = directory / MANIFEST
    check_version(manifest, DIRECTORY_FORMAT_VERSION, str(source))
    if manifest.get("metric") != metric:
        raise StoreFileError(f"{source}: metric {manifest.get('metric')!r}, the layer reads {metric!r}")
    records = manifest.get("files")
    keys_saved = isinstance(records, dict) and "keys.npy" in records
    names = ["values", "live", *(["keys"] if keys_saved else [])]
    required = [f"{name}.npy" for name in names] + ([] if keys_saved else [INDEX_FILE])
    verify_files(directory, records, required)
    arrays = {name: _load_npy(directory / f"{name}.npy") for name in names}
    live = arrays["live"].astype(bool)
    if not keys_saved:
        arrays["keys"] = keys_from_hnsw(directory / INDEX_FILE, live, key_dim, str(directory / INDEX_FILE))
    for name, shape in {"keys": (len(live), key_dim), "values": (len(live), entry_dim)}.items():
        if arrays[name].shape != shape:
            raise StoreFileError(f"{directory / name}.npy: shape {arrays[name].shape}, expected {shape}")
    return torch.from_numpy(arrays["keys"]), torch.from_numpy(arrays["values"]), torch.from_numpy(live)


def _load_npy(path: Path) -> np.ndarray:
    """The array saved at ``path``, never unpickled, memory-mapped copy-on-write."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="c")
    except (OSError, ValueError, EOFError) as error:
        raise StoreFileError(f"{path}: not a readable .npy array ({error})") from error
