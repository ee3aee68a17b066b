"""Product-cell index (an inverted multi-index, Babenko & Lempitsky 2012): keys filed into ``n²`` cells
named by the product keys of Lample et al. (2019), searched by visiting the cells nearest the query.

Each key is filed under the cell ``(i, j)`` whose two sub-keys ``a_i``, ``b_j`` (fixed random tables
``(n, D/2)``, unit rows, the same on every replica) score highest against the key's two halves. A query
scores both sub-key tables (``2 · n · D/2`` multiply-adds), takes the ``probe_cells`` cells of highest
``q₁·a_i + q₂·b_j`` and ranks, exactly, the keys filed there. Unlike :mod:`dmt.memory.product`, whose keys
*are* the cells, the keys here are the store's own, so the store inserts and evicts: an insert files one
key (a sub-key scoring and a row copy) instead of linking it into a graph as hnswlib does (slow in a
large graph).

Layout, all torch on the index's device:

- ``table (R, D + 1)``: ``[-v | 1]`` per label, kept as :class:`~dmt.memory.exact.ExactIndex` (which this
  index extends) keeps it: distance ``1 - q·v`` by one dot with ``[q | 1]``, cosine keys normalised on
  insertion, nothing saved (the store rebuilds the index from its keys).
- The cells as compressed rows: labels sorted by cell (``order``) and each cell's first position
  (``starts (n² + 1,)``), as of the last *filing*.
- Labels added since the last filing (``pending``) are searched exactly beside the cells; removed or
  re-added labels are dropped from their old cell by the ``filed`` mask. When the pending labels exceed
  :data:`PENDING_FRACTION` of the live ones (at least :data:`PENDING_MIN`), they are filed: one sort of the
  live labels by cell.

Recall depends on the keys: cells follow the data only as far as random sub-keys do, so keys spread evenly
in every direction (iid Gaussian) are the hardest case, where the true neighbours of a query lie in many
cells; keys near each other share cells. Only ``ip`` and ``cosine`` are supported (unit sub-keys score
directions), and ranking by ``|q·k|`` is not (it would need the cells of ``-q`` as well).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dmt.memory.exact import ExactIndex

CELL_METRICS = ("ip", "cosine")
SUBKEY_SEED = 0
# Keys per cell that the derived number of cells aims at: n = the power of two nearest sqrt(capacity / it).
KEYS_PER_CELL = 16
# Cells visited per query when ``probe_cells`` is not given (all of them in a store of fewer cells).
DEFAULT_PROBE = 64
# Pending labels are filed into the cells once they exceed this share of the live labels ...
PENDING_FRACTION = 1 / 64
# ... and this many (small stores are searched from the pending list alone for a while).
PENDING_MIN = 4096
# Candidate (query, label) pairs per scoring block: bounds the gathered (pairs, D + 1) rows to ~256 MiB.
MAX_BLOCK_CANDIDATES = 2**20


def derived_cells_per_half(capacity: int) -> int:
    """``n`` for a store of ``capacity``: the power of two nearest ``sqrt(capacity / KEYS_PER_CELL)``."""
    return 2 ** max(0, round(math.log2(math.sqrt(max(1, capacity / KEYS_PER_CELL)))))


class CellIndex(ExactIndex):
    """k-nearest search over the keys filed in the ``probe_cells`` cells nearest each query, plus the keys
    added since the last filing.

    Args:
        cells_per_half: ``n`` (``n²`` cells); None derives it from the capacity
            (:func:`derived_cells_per_half`).
        probe_cells: cells visited per query (more is slower and finds more true neighbours); None: at most
            :data:`DEFAULT_PROBE`.
    """

    backend = "cells"

    def __init__(
        self,
        dim: int,
        metric: str,
        capacity: int,
        cells_per_half: int | None = None,
        probe_cells: int | None = None,
    ) -> None:
        self.n, self.probe_cells = self.check_settings(dim, metric, capacity, cells_per_half, probe_cells)
        super().__init__(dim, metric, capacity)  # the table of every key, as the exact index keeps it
        generator = torch.Generator().manual_seed(SUBKEY_SEED)
        subkeys = torch.randn(2, self.n, dim // 2, generator=generator)
        self._subkeys = torch.nn.functional.normalize(subkeys, dim=2)  # (2, n, D/2), unit rows
        self._cell = torch.full((capacity,), -1, dtype=torch.int64)  # (capacity,) cell of each live label
        self._filed = torch.zeros(capacity, dtype=torch.bool)  # (capacity,) in `order` with its current key
        self._order = torch.zeros(0, dtype=torch.int64)  # (F,) filed labels, sorted by cell
        self._starts = torch.zeros(self.n * self.n + 1, dtype=torch.int64)  # (n² + 1,) each cell's first
        self._pending = torch.zeros(0, dtype=torch.int64)  # (P,) labels added since the last filing

    @staticmethod
    def check_settings(
        dim: int, metric: str, capacity: int, cells_per_half: int | None, probe_cells: int | None
    ) -> tuple[int, int]:
        """``(n, probe_cells)`` for valid settings; ``ValueError`` naming the one that cannot work."""
        if metric not in CELL_METRICS:
            raise ValueError(
                f"a cells index needs metric ip or cosine (unit sub-keys score directions), got {metric!r}"
            )
        if dim % 2:
            raise ValueError(f"a cells index needs an even key dim, got {dim}")
        n = derived_cells_per_half(capacity) if cells_per_half is None else cells_per_half
        if probe_cells is None and isinstance(n, (int, np.integer)) and not isinstance(n, bool):
            probe_cells = min(DEFAULT_PROBE, n * n)
        for name, value in (("cells_per_half", n), ("probe_cells", probe_cells)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if probe_cells > n * n:
            raise ValueError(f"probe_cells ({probe_cells}) exceeds the {n * n} cells (cells_per_half² )")
        return int(n), int(probe_cells)

    @property
    def params(self) -> dict[str, Any]:
        return {"backend": self.backend, "cells_per_half": self.n, "probe_cells": self.probe_cells}

    @property
    def pending(self) -> torch.Tensor:
        """``(P,)`` labels added since the last filing, searched exactly."""
        return self._pending

    @property
    def pending_entries(self) -> int:
        return len(self._pending)

    def to(self, device: torch.device | str) -> CellIndex:
        super().to(device)
        for name in ("_subkeys", "_cell", "_filed", "_order", "_starts", "_pending"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _half_scores(self, vectors: torch.Tensor, half: int) -> torch.Tensor:
        """``(N, n)`` sub-key scores of one half of ``vectors (N, D)``."""
        return vectors[:, half * (self.dim // 2) : (half + 1) * (self.dim // 2)] @ self._subkeys[half].T

    def cells_of(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(N,)`` cell ``i · n + j`` of each of ``vectors (N, D)``: the best sub-key of each half."""
        return self._half_scores(vectors, 0).argmax(1) * self.n + self._half_scores(vectors, 1).argmax(1)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        super().add(labels, vectors)  # checked, and written to the table (normalised for cosine)
        labels = np.asarray(labels, dtype=np.int64).ravel()
        if not len(labels):
            return
        at = torch.from_numpy(labels).to(self.device)
        self._cell[at] = self.cells_of(-self._table[at, : self.dim])  # rows hold -v (ip, cosine)
        self._filed[at] = False  # a re-added label leaves its old cell
        self._pending = torch.cat([self._pending[~torch.isin(self._pending, at)], at])
        if len(self._pending) > max(PENDING_MIN, PENDING_FRACTION * len(self)):
            self.file_pending()

    def remove(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64).ravel()
        labels = labels[(labels >= 0) & (labels < self.capacity)]
        labels = labels[self._live[labels]]
        super().remove(labels)
        at = torch.from_numpy(labels).to(self.device)
        self._cell[at] = -1
        self._filed[at] = False
        self._pending = self._pending[~torch.isin(self._pending, at)]

    def file_pending(self) -> None:
        """File every live label in its cell (one sort by cell); nothing is pending afterwards."""
        live = torch.from_numpy(np.flatnonzero(self._live)).to(self.device)  # (L,) ascending
        cells = self._cell[live]
        order = torch.argsort(cells, stable=True)  # stable: the filing is the same on every replica
        self._order = live[order]
        counts = torch.bincount(cells, minlength=self.n * self.n)
        self._starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self._filed[:] = False
        self._filed[live] = True
        self._pending = self._pending[:0]

    def _probed_cells(self, queries: torch.Tensor) -> torch.Tensor:
        """``(N, P)`` the ``probe_cells`` cells of highest ``q₁·a_i + q₂·b_j`` per query."""
        per_half = min(self.n, self.probe_cells)
        best = [self._half_scores(queries, half).topk(per_half, dim=1) for half in (0, 1)]  # (N, p) each
        pair_scores = best[0].values[:, :, None] + best[1].values[:, None, :]  # (N, p, p)
        top = pair_scores.flatten(1).topk(self.probe_cells, dim=1).indices  # (N, P)
        return best[0].indices.gather(1, top // per_half) * self.n + best[1].indices.gather(1, top % per_half)

    def _filed_candidates(self, queries: torch.Tensor) -> torch.Tensor:
        """``(N, W)`` labels of the keys filed in each query's probed cells, -1 padded to the longest row
        (labels filed under an older key, or removed since, are -1 too)."""
        cells = self._probed_cells(queries).flatten()  # (N·P,)
        begins, lengths = self._starts[cells], self._starts[cells + 1] - self._starts[cells]
        per_query = lengths.view(len(queries), -1).sum(1)  # (N,)
        total, width = int(per_query.sum()), int(per_query.max())
        query_rows = torch.arange(len(queries), device=self.device).repeat_interleave(per_query)  # (C,)
        # Position of each candidate in `order`: its cell's begin plus its rank within the cell; and in its
        # query's row: its rank among that query's candidates.
        ranks = torch.arange(total, device=self.device)
        in_order = (begins - (torch.cumsum(lengths, 0) - lengths)).repeat_interleave(lengths) + ranks
        in_row = ranks - (torch.cumsum(per_query, 0) - per_query)[query_rows]
        labels = self._order[in_order]  # (C,)
        candidates = torch.full((len(queries), width), -1, dtype=torch.int64, device=self.device)
        candidates[query_rows, in_row] = torch.where(self._filed[labels], labels, -1)
        return candidates

    def _search_on_device(
        self, queries: torch.Tensor, k: int, by_magnitude: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if by_magnitude:
            raise ValueError("a cells index ranks by q·k only: ranking by |q·k| would need the cells of -q")
        labels = torch.full((len(queries), k), -1, dtype=torch.int64, device=self.device)
        distances = torch.full((len(queries), k), float("inf"), device=self.device)
        if not len(self) or not len(queries):
            return labels, distances
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        augmented = torch.cat([queries, queries.new_ones(len(queries), 1)], dim=1)  # (N, D + 1)
        # Queries per block so that its candidates stay near MAX_BLOCK_CANDIDATES.
        per_query = max(1, len(self) * self.probe_cells // (self.n * self.n) + len(self._pending))
        block = max(1, MAX_BLOCK_CANDIDATES // per_query)
        pending_keys = self._table[self._pending]  # (P, D + 1): the unfiled keys, scored by every query
        for begin in range(0, len(queries), block):
            found_labels, found = self._search_block(augmented[begin : begin + block], pending_keys, k)
            labels[begin : begin + block, : found.shape[1]] = found_labels
            distances[begin : begin + block, : found.shape[1]] = found
        return labels, distances

    def _search_block(
        self, augmented: torch.Tensor, pending_keys: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and distances ``(b, k')``, ``k' <= k``, for augmented queries ``(b, D + 1)`` among the
        keys filed in their probed cells and the ``pending_keys (P, D + 1)``; -1 / +inf where none."""
        b = len(augmented)
        row_labels = self._filed_candidates(augmented[:, : self.dim])  # (b, W)
        # The filed candidates: one row gather and one batched product, (b, W, D + 1) by (b, D + 1, 1).
        keys = torch.index_select(self._table, 0, row_labels.clamp_min(0).flatten()).view(b, -1, self.dim + 1)
        rows = torch.bmm(keys, augmented[:, :, None]).squeeze(2).masked_fill_(row_labels < 0, float("inf"))
        if len(pending_keys):  # shared by every query: one matmul
            rows = torch.cat([rows, augmented @ pending_keys.T], 1)  # (b, W + P)
            row_labels = torch.cat([row_labels, self._pending.expand(b, -1)], 1)
        top = rows.topk(min(k, rows.shape[1]), dim=1, largest=False, sorted=True)
        found = top.values.isfinite()
        return torch.where(found, row_labels.gather(1, top.indices), -1), top.values
