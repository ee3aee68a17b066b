"""Brute-force key index: one matmul and a top-k per block of queries, recall 1 by construction.

Inserting is a row copy, so a full store churns at memory speed instead of relinking an hnswlib graph;
searching costs ``rows · dim`` multiply-adds per query, where ``rows`` is the high-water mark of the live
labels (the highest + 1, not the capacity: a store fills its lowest free slots first, so the rows below it
are live but for the holes merges leave), which beats a graph walk for small stores. The table grows with
the high-water mark, so an empty large store costs no memory. The index holds nothing but the store's keys,
so it is never saved: a restored store rebuilds it from them. The table lives on the index's device
(:meth:`ExactIndex.to`), where searches run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dmt.memory.base import as_float_matrix
from dmt.memory.index import HOST, TorchKeyIndex

# Distances per block of queries, (block, rows): small enough that the top-k reads them while they are
# still in cache (dmt.bench's exact_blocks section compares sizes side by side; docs/results.md).
MAX_BLOCK_ELEMENTS = 2**22
# Rows allocated at first; the table then doubles as the high-water mark passes its size.
INITIAL_ROWS = 1024


class ExactIndex(TorchKeyIndex):
    """Exact k-nearest search over labels ``0 .. capacity - 1`` in the ``dmt.memory.metrics`` conventions.

    Distances are ``offset[label] - scale · q·v``, formed by a single matmul per block of queries: each
    row of the table is ``[-scale · v | offset]`` and each query gets a trailing 1, so no separate pass
    adds the offsets to the ``(block, rows)`` result (for small ``dim`` that pass costs as much as
    the matmul). ``offset`` holds ``1`` (ip, cosine) or ``||v||²`` (l2) for live labels and ``+inf`` for
    free ones, so free slots are never returned while ``k`` does not exceed the live count. l2 adds
    ``||q||²`` after the top-k (it does not change the order). Cosine vectors are normalised on
    insertion, as in hnswlib. Ranking by ``|q·v|`` (``ip``, ``cosine``) reads ``|1 - distance|`` off the
    same matmul, free rows masked: one pass, not a search for ``q`` and one for ``-q``.
    """

    backend = "exact"
    has_file = False
    block_elements: int = MAX_BLOCK_ELEMENTS  # distances per block of queries

    def __init__(self, dim: int, metric: str, capacity: int) -> None:
        super().__init__(dim, metric, capacity)
        self._scale = 2.0 if self.metric == "l2" else 1.0  # a power of two: v is recovered exactly
        self._table = self._empty_rows(min(capacity, INITIAL_ROWS), HOST)  # (R, D + 1): [-scale · v | offset]
        self._rows = 0  # high-water mark: labels >= it are free, and not searched

    def _empty_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """``(n, D + 1)`` free table rows (offset +inf) on ``device``."""
        rows = torch.zeros(n, self.dim + 1, device=device)
        rows[:, self.dim] = float("inf")
        return rows

    @property
    def device(self) -> torch.device:
        return self._table.device

    def to(self, device: torch.device | str) -> ExactIndex:
        self._table = self._table.to(device)
        return self

    def _reserve(self, rows: int) -> None:
        """Grow the table (doubling, at most to capacity) to hold at least ``rows`` rows."""
        if rows > len(self._table):
            size = min(self.capacity, max(rows, 2 * len(self._table)))
            self._table = torch.cat([self._table, self._empty_rows(size - len(self._table), self.device)])

    def _offsets(self, rows: torch.Tensor) -> torch.Tensor:
        """``(M,)`` offsets of live ``rows (M, D)``."""
        return rows.pow(2).sum(1) if self.metric == "l2" else rows.new_ones(len(rows))

    @property
    def params(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def _prepared(self, vectors: np.ndarray) -> torch.Tensor:
        """``vectors (M, D)`` checked, as rows on the table's device (normalised for cosine)."""
        rows = torch.from_numpy(as_float_matrix("vectors", vectors, self.dim)).to(self.device)
        if self.metric == "cosine":
            rows = torch.nn.functional.normalize(rows, dim=1)
        return rows

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        labels = self._check_labels(labels)
        rows = self._prepared(vectors)
        if len(labels) != len(rows):
            raise ValueError(f"got {len(labels)} labels for {len(rows)} vectors")
        if len(np.unique(labels)) != len(labels):
            raise ValueError("labels must be distinct within one add")
        if not len(labels):
            return
        self._rows = max(self._rows, int(labels.max()) + 1)
        self._reserve(self._rows)
        if len(labels) > 1 and (np.diff(labels) == 1).all():
            # A run of labels (a store rebuilding its index) is written in place: no (M, D) temporaries.
            block = self._table[labels[0] : labels[-1] + 1]  # (M, D + 1) view
            block[:, : self.dim].copy_(rows).mul_(-self._scale)
            block[:, self.dim] = self._offsets(rows)
        else:
            self._table[torch.from_numpy(labels).to(self.device)] = torch.cat(
                [-self._scale * rows, self._offsets(rows)[:, None]], 1
            )
        self._live[labels] = True

    def remove(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64).ravel()
        labels = labels[(labels >= 0) & (labels < self._rows)]
        self._table[torch.from_numpy(labels).to(self.device), self.dim] = float("inf")
        self._live[labels] = False
        if len(labels) and not self._live[self._rows - 1]:
            live = np.flatnonzero(self._live[: self._rows])
            self._rows = int(live[-1]) + 1 if len(live) else 0

    def _search_on_device(
        self, queries: torch.Tensor, k: int, by_magnitude: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.full((len(queries), k), -1, dtype=torch.int64, device=self.device)
        distances = torch.full((len(queries), k), float("inf"), device=self.device)
        k_live = min(k, len(self))
        if k_live == 0 or len(queries) == 0:
            return labels, distances
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        augmented = torch.cat([queries, queries.new_ones(len(queries), 1)], dim=1)  # (N, D + 1)
        table = self._table[: self._rows]  # (rows, D + 1)
        free = table[:, self.dim].isinf() if by_magnitude else None  # (rows,)
        block = max(1, self.block_elements // self._rows)
        for begin in range(0, len(queries), block):
            all_distances = augmented[begin : begin + block] @ table.T  # (b, rows)
            if free is not None:
                # |s| = |1 - distance| of live rows; free rows (distance +inf) rank below every live one.
                magnitude = (1.0 - all_distances).abs_().masked_fill_(free, -1.0)
                top = magnitude.topk(k_live, dim=1, sorted=True)
                found = all_distances.gather(1, top.indices)
            else:
                top = all_distances.topk(k_live, dim=1, largest=False, sorted=True)
                found = top.values
            if self.metric == "l2":
                squared_norms = queries[begin : begin + block].pow(2).sum(1, keepdim=True)
                found = (found + squared_norms).clamp_min(0.0)
            labels[begin : begin + block, :k_live] = top.indices
            distances[begin : begin + block, :k_live] = found
        return labels, distances
