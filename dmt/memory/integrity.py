"""On-disk integrity of saved stores: checksummed writes, and the reading checks' errors as dmt's.

A saved store is a directory whose ``manifest.json`` records, for every file written next to it, the
size in bytes and the SHA-256 (``{"files": {name: {"bytes": int, "sha256": hex}}}``); the checks that read
it back are :mod:`dmt.kernel.store_files` (an export reads its stores with them). Directories are written
with :func:`dmt.files.write_directory`, so a crash or a full disk leaves either the previous store or the
new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dmt.errors import InputFileError
from dmt.kernel.store_files import FileRecord, StoreFileError


class MemoryStoreError(InputFileError):
    """A saved store or a state dict is malformed, truncated, corrupt or disagrees with its manifest."""


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


@contextmanager
def store_errors(kind: type[InputFileError] = MemoryStoreError) -> Iterator[None]:
    """Report the checks of :mod:`dmt.kernel` on files (a ``StoreFileError``) as a ``kind`` (by default
    :class:`MemoryStoreError`), which commands report by name."""
    try:
        yield
    except StoreFileError as error:
        raise kind(str(error)) from error
