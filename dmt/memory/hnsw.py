"""The single hnswlib wrapper of the project: numpy in, numpy out.

hnswlib facts this wrapper relies on (hnswlib 0.8.0):

- Distances follow ``dmt.memory.metrics``: ``l2`` is squared L2, ``ip`` is ``1 - q·k``, ``cosine`` is
  ``1 - cos`` (vectors are normalised on insertion, so the graph never stores the raw cosine keys).
- ``add_items`` on an existing label, deleted or not, updates that point in place (and un-deletes it),
  so with labels restricted to ``[0, capacity)`` the graph never grows beyond ``capacity`` elements.
- Deleted points stay in the graph for navigation; hnswlib does not expose which labels are deleted,
  so this wrapper mirrors that in a ``live`` mask which must be handed back on :meth:`load`.
- ``knn_query`` raises ``RuntimeError`` when it finds fewer than k results for any row (always when
  k > live points, occasionally with many deleted points); :meth:`search` pads instead.
- ``ef`` is index-wide mutable state: concurrent searches from several Python threads race on it.
- ``knn_query`` needs ``ef >= k``; every search here raises ef to at least k.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from dmt.memory.base import as_float_matrix
from dmt.memory.hnsw_file import check_hnsw_file
from dmt.memory.index import KeyIndex

# derived_ef(): ef = k + size^EF_SIZE_EXPONENT, see its docstring for why the size enters as a power.
EF_SIZE_EXPONENT = 0.65


def derived_ef(k: int, size: int) -> int:
    """Search breadth for ``k`` neighbours among ``size`` live points when ``ef_search`` is None:
    ``k + ⌈size^0.65⌉``, at most ``size`` and never below ``k``.

    The rule aims at recall@k >= 0.97 against exact search with the default graph (``M=16``,
    ``ef_construction=100``) whatever the keys. Clustered keys need an ef between k and a small multiple
    of k; iid Gaussian keys, the hardest case (no low-dimensional structure), need an ef that grows like a
    power of the size a little below the exponent, so ``k + size^0.65`` stays above that need with a
    margin as the store grows. For structured keys it is conservative: in a large store it searches far
    longer than a small fixed ``ef_search`` (longer than the ``exact`` backend would take); an explicit
    ``ef_search`` suits keys known to be easier.
    """
    return max(k, min(size, k + math.ceil(size**EF_SIZE_EXPONENT)))


class HnswIndex(KeyIndex):
    """Approximate kNN index over integer labels (store slots) ``0 .. capacity - 1``.

    ``ef_search`` is the search breadth (raised to k per search); None derives it per search from k and
    the live size (:func:`derived_ef`).
    """

    backend = "hnsw"

    def __init__(
        self,
        dim: int,
        metric: str,
        capacity: int,
        M: int = 16,
        ef_construction: int = 100,
        ef_search: int | None = None,
        num_threads: int = -1,
    ) -> None:
        self._configure(dim, metric, capacity, ef_search, num_threads)
        self._index.init_index(max_elements=capacity, M=M, ef_construction=ef_construction)

    def _configure(
        self, dim: int, metric: str, capacity: int, ef_search: int | None, num_threads: int
    ) -> None:
        """Shared by ``__init__`` and :meth:`load`: everything except building/reading the graph.

        The base class's ``_live`` mirrors hnswlib's non-deleted labels, which hnswlib does not expose.
        """
        super().__init__(dim, metric, capacity)
        self.set_ef(ef_search)
        self.num_threads = num_threads
        self._index = hnswlib.Index(space=self.metric, dim=dim)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "M": int(self._index.M),
            "ef_construction": int(self._index.ef_construction),
            "ef_search": self.ef_search,
            "num_threads": self.num_threads,
        }

    def set_ef(self, ef_search: int | None) -> None:
        """Search breadth; raised to k per query, larger is slower and more exact. None: derived per search
        from k and the live size (:func:`derived_ef`)."""
        if ef_search is not None and (
            isinstance(ef_search, bool) or not isinstance(ef_search, (int, np.integer)) or ef_search < 1
        ):
            raise ValueError(f"ef_search must be an integer >= 1 or None, got {ef_search!r}")
        self.ef_search = None if ef_search is None else int(ef_search)

    def ef(self, k: int) -> int:
        """The search breadth of a ``k``-nearest search now: ``ef_search`` (or :func:`derived_ef`), >= k."""
        return max(derived_ef(k, len(self)) if self.ef_search is None else self.ef_search, k)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        labels = self._check_labels(labels)
        vectors = as_float_matrix("vectors", vectors, self.dim)
        if len(labels) != len(vectors):
            raise ValueError(f"got {len(labels)} labels for {len(vectors)} vectors")
        if len(np.unique(labels)) != len(labels):
            # Threads would update the same point concurrently; the outcome would depend on scheduling.
            raise ValueError("labels must be distinct within one add")
        if len(labels):
            # One thread: a multi-threaded build gives a graph that depends on thread timing, and replicas
            # that apply the same inserts (data-parallel training) must end with the same index.
            self._index.add_items(vectors, labels, num_threads=1)
            self._live[labels] = True

    def remove(self, labels: np.ndarray) -> None:
        """Mark ``labels (M,)`` deleted in the graph (deleted points still route searches)."""
        labels = np.asarray(labels, dtype=np.int64).ravel()
        labels = labels[(labels >= 0) & (labels < self.capacity)]
        for label in np.unique(labels[self._live[labels]]):
            self._index.mark_deleted(int(label))
        self._live[labels] = False

    def _knn(self, queries: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        self._index.set_ef(ef)
        labels, distances = self._index.knn_query(queries, k=k, num_threads=self.num_threads)
        return labels.astype(np.int64), distances

    def _search_row(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best-effort search of one ``query (1, D)``: widen ef, then shrink k until hnswlib answers."""
        total = max(int(self._index.element_count), k)
        ef = self.ef(k)
        while True:
            try:
                return self._knn(query, k, ef)
            except RuntimeError:
                if ef >= total:
                    break
                ef = min(2 * ef, total)
        # With ef covering every stored point the candidate set no longer depends on k, so success is
        # monotone in k and a binary search finds the largest k that the graph can deliver.
        best = (np.empty((1, 0), dtype=np.int64), np.empty((1, 0), dtype=np.float32))
        lo, hi = 1, k - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            try:
                best, lo = self._knn(query, mid, total), mid + 1
            except RuntimeError:
                hi = mid - 1
        return best

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = as_float_matrix("queries", queries, self.dim)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        distances = np.full((len(queries), k), np.inf, dtype=np.float32)
        k_live = min(k, len(self))
        if k_live == 0 or len(queries) == 0:
            return labels, distances
        try:
            labels[:, :k_live], distances[:, :k_live] = self._knn(queries, k_live, self.ef(k_live))
        except RuntimeError:
            # Some row came back short (sparse graph after many deletions): redo rows one at a time.
            for row in range(len(queries)):
                found_labels, found_distances = self._search_row(queries[row : row + 1], k_live)
                labels[row, : found_labels.shape[1]] = found_labels[0]
                distances[row, : found_labels.shape[1]] = found_distances[0]
        return labels, distances

    def save(self, path: str | Path) -> None:
        """Write the hnswlib graph (vectors, links, deletion marks) to ``path``."""
        self._index.save_index(str(path))

    @classmethod
    def load(
        cls,
        path: str | Path,
        dim: int,
        metric: str,
        capacity: int,
        live: np.ndarray,
        ef_search: int | None = None,
        num_threads: int = -1,
        **_build_params: Any,
    ) -> HnswIndex:
        """Read a graph written by :meth:`save`, checked first (:func:`check_hnsw_file`: hnswlib would
        crash on a malformed one).

        Args:
            live: ``(capacity,)`` bool mask of live labels (hnswlib cannot report deletions).
            _build_params: ``backend``/``M``/``ef_construction`` are accepted (so :attr:`params` can be
                splatted); the file holds them, and ``M`` must be its degree.
        """
        check_hnsw_file(path, dim, capacity, _build_params.get("M"))
        index = cls.__new__(cls)
        index._configure(dim, metric, capacity, ef_search, num_threads)
        index._index.load_index(str(path), max_elements=capacity)
        live = index._check_live(live)
        stored = np.zeros(capacity, dtype=bool)
        stored[np.asarray(index._index.get_ids_list(), dtype=np.int64)] = True
        if (live & ~stored).any():
            raise ValueError(f"live mask names labels that are not in the index file {path}")
        index._live = live
        return index
