"""The interface of the key indexes behind ``KNNStore`` and what every backend shares.

A key index maps integer labels (the store's slots ``0 .. capacity - 1``) to vectors and answers k-nearest
queries over the live ones: numpy in and out (:meth:`KeyIndex.search`) or torch in and out on the queries'
device (:meth:`KeyIndex.search_torch`); ``dmt.memory.backends`` lists the backends. Host indexes (hnsw)
search numpy arrays on the host; :class:`TorchKeyIndex` ones (exact, product) compute in torch on their
:attr:`~KeyIndex.device`, which :meth:`~KeyIndex.to` moves. An index that holds something beyond the
store's keys (a graph, sub-key tables) is saved as a file next to them; one that holds nothing more
(:attr:`KeyIndex.has_file` False) is rebuilt from the keys instead. Files always hold host arrays.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.memory.base import as_float_matrix
from dmt.memory.metrics import Metric, check_metric

HOST = torch.device("cpu")


class KeyIndex(ABC):
    """Labels ``0 .. capacity - 1`` → vectors of ``dim``, searched by ``metric`` (dmt.memory.metrics)."""

    backend: str
    # True for indexes whose keys are determined by the label (product keys): the store is then full from
    # construction and never inserts or removes.
    keys_are_fixed: bool = False
    # False for indexes that hold nothing beyond the store's keys: they write no file (no save/load), and a
    # restored store rebuilds them by adding its live keys.
    has_file: bool = True
    # Index searches that a ranking by |q·k| (``by_magnitude``) costs: a host index searches for q and for
    # -q and merges the two (merge_by_magnitude).
    magnitude_searches: int = 2

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

    @property
    def device(self) -> torch.device:
        """Where the index searches: the host, for an index that is not computed in torch (hnsw)."""
        return HOST

    def to(self, device: torch.device | str) -> KeyIndex:
        """Put the searchable state on ``device``; a host index (hnsw) stays on the host. Returns self."""
        return self

    def search_torch(
        self, queries: torch.Tensor, k: int, by_magnitude: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for float32 ``queries (N, D)`` on any device, answered on that device.

        ``by_magnitude`` (``ip``, ``cosine``): the ``k`` labels of largest ``|q·v|``, largest first, with
        the distances of ``q`` itself (:func:`merge_by_magnitude`). A host index sends the queries to the
        host once and its results back once (no copy at all for host queries); it checks them for NaN/inf
        as :meth:`search` does.

        Returns:
            labels ``(N, k)`` int64 and distances ``(N, k)`` float32, as :meth:`search`.
        """
        self._check_ranking(by_magnitude)
        host_queries = queries.detach().cpu().numpy()  # (N, D): the one device→host copy
        labels, distances = (torch.from_numpy(array) for array in self.search(host_queries, k))
        if by_magnitude:
            negative = tuple(torch.from_numpy(array) for array in self.search(-host_queries, k))
            labels, distances = merge_by_magnitude((labels, distances), negative)
        return labels.to(queries.device), distances.to(queries.device)  # the one host→device copy

    @property
    def search_state(self) -> dict[str, Any]:
        """What the index derived at run time and a report should show (faiss: its lists and probes);
        empty for an index whose settings say everything."""
        return {}

    def set_ef(self, ef_search: int | None) -> None:
        """The search breadth of a graph index (hnsw); ``ValueError`` for the others, which have none."""
        raise ValueError(f"ef_search is an hnsw setting; this store's index is {self.backend}")

    def refuse_if_keys_fixed(self, operation: str) -> None:
        """``ValueError`` naming ``operation`` (``insert``, ``recombine``) if this index fixes the keys, which
        its store then cannot write."""
        if self.keys_are_fixed:
            raise ValueError(
                f"cannot {operation}: this store's keys are fixed by its {self.backend} index "
                "(it is full from the start and learns through update_values)"
            )

    def _check_ranking(self, by_magnitude: bool) -> None:
        """``ValueError`` for a ranking by |similarity| under l2, which has no similarity to rank by."""
        if by_magnitude and self.metric == "l2":
            raise ValueError("by_magnitude ranks by |similarity|: needs an ip or cosine index, not l2")

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


class TorchKeyIndex(KeyIndex):
    """A key index computed in torch on its :attr:`device` (the host until :meth:`to` moves it).

    :meth:`search_torch` keeps queries and results on the device the queries are on (moving the queries to
    the index's device and the results back only when those differ), and ranks by ``|q·v|`` in one pass
    over the keys. The numpy :meth:`search` wraps it.
    """

    magnitude_searches = 1

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device of the searchable state."""

    @abstractmethod
    def to(self, device: torch.device | str) -> TorchKeyIndex:
        """Move the searchable state to ``device``; returns self."""

    def search_torch(
        self, queries: torch.Tensor, k: int, by_magnitude: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`KeyIndex.search_torch`; queries are not checked for NaN/inf (on an accelerator that
        would wait for the device): a non-finite query gets non-finite distances to its neighbours."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._check_ranking(by_magnitude)
        # (N, D): no copy when the index is on the queries' device, and none back.
        labels, distances = self._search_on_device(queries.to(self.device), k, by_magnitude)
        return labels.to(queries.device), distances.to(queries.device)

    @abstractmethod
    def _search_on_device(
        self, queries: torch.Tensor, k: int, by_magnitude: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search_torch` for checked ``queries (N, D)`` on :attr:`device`, answering there."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries_t = torch.from_numpy(as_float_matrix("queries", queries, self.dim))  # (N, D) on the host
        labels, distances = self.search_torch(queries_t, k)
        return labels.numpy(), distances.numpy()


def merge_by_magnitude(
    positive: tuple[torch.Tensor, torch.Tensor], negative: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest ``|s|`` (``s = 1 - distance``, an ``ip``/``cosine`` similarity) from the
    top-k of the query (``positive``) and of the negated query (``negative``), each ``(ids, distances)``
    of shape ``(N, k)``. Returns ``(ids, distances)`` ``(N, k)``, largest ``|s|`` first, distances of the
    query itself (``1 - s``), padding -1 / +inf, on the inputs' device.

    Exact: an entry with ``s >= 0`` among the overall top-k by ``|s|`` is within the query's top-k, one
    with ``s < 0`` within the negated query's. Keeping each list's own sign makes the two disjoint.
    """
    (pos_ids, pos_dist), (neg_ids, neg_dist) = positive, negative
    k = pos_ids.shape[1]
    similarity = torch.cat([1.0 - pos_dist, neg_dist - 1.0], dim=1)  # (N, 2k), of the query
    ids = torch.cat([pos_ids, neg_ids], dim=1)  # (N, 2k)
    own_side = torch.cat([similarity[:, :k] >= 0, similarity[:, k:] < 0], dim=1) & (ids >= 0)
    magnitude = torch.where(own_side, similarity.abs(), -1.0)
    order = torch.argsort(-magnitude, dim=1, stable=True)[:, :k]  # (N, k)
    kept = own_side.gather(1, order)
    ids = torch.where(kept, ids.gather(1, order), -1)
    distances = torch.where(kept, 1.0 - similarity.gather(1, order), float("inf"))
    return ids.long(), distances.float()
