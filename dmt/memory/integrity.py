"""On-disk integrity of saved stores: checksummed writes and verification against a manifest.

A saved store is a directory whose ``manifest.json`` records, for every file written next to it, the
size in bytes and the SHA-256 (``{"files": {name: {"bytes": int, "sha256": hex}}}``). Directories are
written with :func:`dmt.files.write_directory`, so a crash or a full disk leaves either the previous store
or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dmt.errors import InputFileError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20  # bytes per read while hashing: bounded memory for stores larger than RAM


class MemoryStoreError(InputFileError):
    """A saved store or a state dict is malformed, truncated, corrupt or disagrees with its manifest."""


FileRecord = dict[str, Any]  # {"bytes": int, "sha256": str}


class _HashingWriter:
    """Write-only file wrapper that hashes and counts the bytes passing through (``np.save`` target).

    ``np.save`` streams non-``io`` file objects in bounded chunks, so hashing while writing costs no
    second pass over the data and no extra copy of the array.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._sha256 = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> int:
        self._sha256.update(data)
        self._size += len(data)
        return self._file.write(data)

    def record(self) -> FileRecord:
        return {"bytes": self._size, "sha256": self._sha256.hexdigest()}


def write_array(path: Path, array: np.ndarray) -> FileRecord:
    """``np.save`` ``array`` (never pickled) to ``path``, fsynced; returns the file's integrity record."""
    with open(path, "wb") as file:
        writer = _HashingWriter(file)
        np.save(writer, array, allow_pickle=False)  # type: ignore[arg-type]  # duck-typed file object
        file.flush()
        os.fsync(file.fileno())
    return writer.record()


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
        MemoryStoreError: the manifest is not UTF-8 JSON or not a JSON object.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (not a saved KNNStore, or an interrupted save)")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both derive from ValueError
        raise MemoryStoreError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise MemoryStoreError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _check_record(manifest: Path, name: Any, record: Any) -> None:
    """Reject records that could not have been written by :func:`write_array` / :func:`file_record`."""
    # A name such as "../x" would make verification read outside the store directory.
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise MemoryStoreError(f"{manifest}: file name {name!r} is not a plain file name")
    valid = (
        isinstance(record, dict)
        and type(record.get("bytes")) is int
        and record["bytes"] >= 0
        and isinstance(record.get("sha256"), str)
        and len(record["sha256"]) == 64
    )
    if not valid:
        raise MemoryStoreError(f"{manifest}: malformed integrity record for {name}: {record!r}")


def verify_files(directory: Path, records: Any, required: Collection[str], checksums: bool = True) -> None:
    """Check every file listed in ``records`` (the manifest's ``files``) against ``directory``.

    Sizes are always compared (one ``stat`` per file); with ``checksums`` every file is also read once
    and hashed, which costs a full pass over the store (SHA-256 on one core).

    Raises:
        MemoryStoreError: naming the file that is unlisted, missing, of the wrong size or changed.
    """
    manifest = directory / MANIFEST
    if not isinstance(records, dict):
        raise MemoryStoreError(f"{manifest}: 'files' must map file names to integrity records")
    for name in required:
        if name not in records:
            raise MemoryStoreError(f"{manifest}: no integrity record for {name}")
    for name, record in records.items():
        _check_record(manifest, name, record)
        path = directory / name
        if not path.is_file():
            raise MemoryStoreError(f"{path}: missing (listed in {MANIFEST})")
        size, expected = path.stat().st_size, record["bytes"]
        if size != expected:
            hint = "truncated?" if size < expected else "appended to or replaced?"
            raise MemoryStoreError(f"{path}: size {size} bytes, {MANIFEST} says {expected} ({hint})")
        if checksums and file_record(path)["sha256"] != record["sha256"]:
            raise MemoryStoreError(f"{path}: checksum mismatch (file changed or corrupt)")
