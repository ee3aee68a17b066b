"""The interface of the key indexes behind ``KNNStore`` and what every backend shares.

A key index maps integer labels (the store's slots ``0 .. capacity - 1``) to vectors and answers k-nearest
queries over the live ones, numpy in and numpy out; ``dmt.memory.backends`` lists the backends. An index
that holds something beyond the store's keys (a graph, sub-key tables) is saved as a file next to them; one
that holds nothing more (:attr:`KeyIndex.has_file` False) is rebuilt from the keys instead.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from dmt.memory.metrics import Metric, check_metric


class KeyIndex(ABC):
    """Labels ``0 .. capacity - 1`` → vectors of ``dim``, searched by ``metric`` (dmt.memory.metrics)."""

    backend: str
    # True for indexes whose keys are determined by the label (product keys): the store is then full from
    # construction and never inserts or removes.
    keys_are_fixed: bool = False
    # False for indexes that hold nothing beyond the store's keys: they write no file (no save/load), and a
    # restored store rebuilds them by adding its live keys.
    has_file: bool = True

    def __init__(self, dim: int, metric: str, capacity: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.dim = dim
        self.metric: Metric = check_metric(metric)
        self.capacity = capacity
        self._live = np.zeros(capacity, dtype=bool)  # (capacity,) labels added and not removed

    def __len__(self) -> int:
        """Number of live (added and not removed) points."""
        return int(np.count_nonzero(self._live))

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Keyword arguments of :func:`make_index` that reproduce this index (for manifests)."""

    @abstractmethod
    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite ``vectors (N, D)`` under distinct ``labels (N,)``."""

    @abstractmethod
    def remove(self, labels: np.ndarray) -> None:
        """Drop ``labels (M,)``; labels that are not live (including -1) are ignored."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest live labels of each of ``queries (N, D)``; never raises for lack of points.

        Returns:
            labels ``(N, k)`` int64 (-1 padding) and distances ``(N, k)`` float32 (+inf padding),
            ascending per row.
        """

    def save(self, path: str | Path) -> None:
        """Write the index to the file ``path`` (indexes with :attr:`has_file` only)."""
        raise NotImplementedError(f"the {self.backend} index has no file: it is rebuilt from the keys")

    @classmethod
    def load(
        cls, path: str | Path, dim: int, metric: str, capacity: int, live: np.ndarray, **params: Any
    ) -> KeyIndex:
        """Read a :meth:`save` file; ``live (capacity,)`` is the store's mask of live labels (indexes with
        :attr:`has_file` only)."""
        raise NotImplementedError(f"the {cls.backend} index has no file: it is rebuilt from the keys")

    def _check_labels(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64).ravel()
        if labels.size and (labels.min() < 0 or labels.max() >= self.capacity):
            raise ValueError(f"labels must lie in [0, {self.capacity}), got [{labels.min()}, {labels.max()}]")
        return labels

    def _check_live(self, live: np.ndarray) -> np.ndarray:
        live = np.asarray(live, dtype=bool)
        if live.shape != (self.capacity,):
            raise ValueError(f"live mask has shape {live.shape}, expected ({self.capacity},)")
        return live.copy()

    @staticmethod
    def _save_array(path: str | Path, array: np.ndarray) -> None:
        """Write ``array`` as a ``.npy`` file at exactly ``path`` (for indexes stored as one array)."""
        with open(path, "wb") as file:  # np.save(str) would append ".npy" to the name
            np.save(file, array, allow_pickle=False)

    @staticmethod
    def _load_array(path: str | Path, what: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 array of ``shape`` saved by :meth:`_save_array`; ``ValueError`` naming ``path`` and
        ``what`` it should hold otherwise (never unpickles)."""
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: not a readable index file ({error})") from error
        if array.shape != shape or array.dtype != np.float32:
            raise ValueError(f"{path}: expected {what} {shape} float32, got {array.shape} {array.dtype}")
        return array

    def to_bytes(self) -> np.ndarray:
        """The :meth:`save` file as a ``(B,)`` uint8 array (for checkpoints)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "index.bin"
            self.save(path)
            return np.fromfile(path, dtype=np.uint8)

    @classmethod
    def from_bytes(
        cls, data: np.ndarray, dim: int, metric: str, capacity: int, live: np.ndarray, **params: Any
    ) -> KeyIndex:
        """Inverse of :meth:`to_bytes`; ``params`` as for :meth:`load`."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "index.bin"
            np.asarray(data, dtype=np.uint8).tofile(path)
            return cls.load(path, dim, metric, capacity, live, **params)
