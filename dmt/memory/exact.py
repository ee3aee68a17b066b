"""Brute-force key index: the exact search of :mod:`dmt.kernel.search` over a table kept up to date.

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

from dmt.kernel.search import MAX_BLOCK_ELEMENTS, row_offsets, search_table, table_rows, table_scale
from dmt.memory.base import as_float_matrix
from dmt.memory.index import HOST, TorchKeyIndex

# Rows allocated at first; the table then doubles as the high-water mark passes its size.
INITIAL_ROWS = 1024


class ExactIndex(TorchKeyIndex):
    """Exact k-nearest search over labels ``0 .. capacity - 1`` in the ``dmt.memory.metrics`` conventions:
    row ``label`` of a :mod:`dmt.kernel.search` table holds the vector of that label (offset ``+inf``
    while it is free). Cosine vectors are normalised on insertion, as in hnswlib.
    """

    backend = "exact"
    has_file = False
    block_elements: int = MAX_BLOCK_ELEMENTS  # distances per block of queries

    def __init__(self, dim: int, metric: str, capacity: int) -> None:
        super().__init__(dim, metric, capacity)
        self._scale = table_scale(self.metric)
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

    @property
    def params(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        labels = self._check_labels(labels)
        rows = torch.from_numpy(as_float_matrix("vectors", vectors, self.dim)).to(self.device)  # (M, D)
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
            if self.metric == "cosine":
                rows = torch.nn.functional.normalize(rows, dim=1)
            block = self._table[labels[0] : labels[-1] + 1]  # (M, D + 1) view
            block[:, : self.dim].copy_(rows).mul_(-self._scale)
            block[:, self.dim] = row_offsets(rows, self.metric)
        else:
            self._table[torch.from_numpy(labels).to(self.device)] = table_rows(rows, self.metric)
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
        table = self._table[: self._rows]  # (rows, D + 1)
        return search_table(queries, table, k, len(self), self.metric, by_magnitude, self.block_elements)
