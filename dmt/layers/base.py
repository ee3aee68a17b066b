"""What featural and associative memory layers share: projections, the store, search and weighting.

Both layers are drop-in replacements for a transformer MLP: ``(B, T, C) -> (B, T, C)``. Queries of all
heads of all tokens are searched in one batched call against the layer's single store (heads share the
store, like product-key memories), so the store sees ``B·T·H`` queries per step.

Cold start: an empty store returns no neighbours; a query without neighbours contributes a zero vector,
so a layer with an empty store outputs ``out_proj.bias`` — the block behaves as if its MLP were removed
until inserts fill the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmt.layers.config import MemoryLayerConfig
from dmt.memory import KNNStore, QueryResult
from dmt.memory.metrics import distance

# A store mutation recorded by a layer: (operation, arguments of the store method).
WriteOp = tuple[str, tuple[Any, ...]]
# Store method of each operation, in the order a commit applies them: references and value updates name
# ids from the step's searches, so they go before recombination and inserts can free or reuse slots.
WRITE_METHODS: dict[str, str] = {
    "reference": "reference",
    "update": "update_values",
    "recombine": "recombine",
    "insert": "insert",
}


def apply_writes(store: KNNStore, writes_per_rank: list[list[WriteOp]]) -> None:
    """Apply the recorded writes of every rank to ``store``: operation by operation (see
    ``WRITE_METHODS``), rank by rank. Every replica applying the same lists ends with the same store."""
    for op, method in WRITE_METHODS.items():
        for writes in writes_per_rank:
            for name, args in writes:
                if name == op:
                    getattr(store, method)(*args)


@dataclass
class Retrieved:
    """A search result moved to torch; shapes with ``N = B·T·H`` queries and ``K = topk``."""

    ids: np.ndarray  # (N, K) int64, -1 where no entry
    valid: torch.Tensor  # (N, K) bool
    keys: torch.Tensor  # (N, K, Dk)
    values: torch.Tensor  # (N, K, Dv)
    nearest: np.ndarray  # (N,) distance of the nearest entry, +inf if none


def weighted_sum(
    scores: torch.Tensor,
    valid: torch.Tensor,
    values: torch.Tensor,
    weighting: str,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine neighbour values ``(N, K, Dv)`` with weights from ``scores (N, K)``; invalid ones get 0.

    ``softmax`` normalises over the neighbours; ``relu``/``gelu``/``silu`` apply the activation to each
    score independently, which makes a store seeded from an MLP's rows compute a top-k MLP. ``gate (N, K)``,
    if given, multiplies the weights (a gated, SwiGLU-like memory).
    """
    if weighting == "softmax":
        weights = scores.masked_fill(~valid, torch.finfo(scores.dtype).min).softmax(dim=-1)
    else:
        weights = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[weighting](scores)
    if gate is not None:
        weights = weights * gate
    weights = weights * valid  # rows without any neighbour sum to zero
    return torch.einsum("nk,nkd->nd", weights, values)


class MemoryLayer(nn.Module):
    """Base class: owns the store, the query and output projections, and per-layer statistics."""

    def __init__(self, d_model: int, cfg: MemoryLayerConfig, store: KNNStore | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.heads = cfg.heads
        self.key_dim = cfg.key_dim
        self.value_dim = cfg.value_dim or d_model // cfg.heads
        # What a store entry holds besides its key: the value, then (gated featural memory) the gate key.
        self.entry_dim = self.value_dim + cfg.glu_dim
        self.store = store or KNNStore(
            key_dim=self.key_dim,
            value_dim=self.entry_dim,
            capacity=cfg.capacity,
            metric=cfg.metric,
            lrfu_lambda=cfg.lrfu_lambda,
            index=dict(cfg.index),
        )
        if (self.store.key_dim, self.store.value_dim) != (self.key_dim, self.entry_dim):
            raise ValueError(
                f"store dims (key {self.store.key_dim}, value {self.store.value_dim}) do not match the "
                f"layer's (key {self.key_dim}, value {self.entry_dim})"
            )
        self.query_proj = nn.Linear(d_model, self.heads * self.key_dim)
        self.out_proj = nn.Linear(self.heads * self.value_dim, d_model)
        self.last_topk_distance = float("nan")
        # When set (by the training loop), store writes wait in `_writes` for `take_writes()`, so that
        # they can be applied once per optimiser step, identically on every data-parallel replica.
        self.deferred_writes = False
        self._writes: list[WriteOp] = []

    def write(self, op: str, *args: Any) -> None:
        """Mutate the store now, or record the mutation when writes are deferred."""
        if self.deferred_writes:
            self._writes.append((op, args))
        else:
            apply_writes(self.store, [[(op, args)]])

    def take_writes(self) -> list[WriteOp]:
        """The recorded writes since the last call, in order; the record is emptied."""
        writes, self._writes = self._writes, []
        return writes

    @property
    def inserting(self) -> bool:
        return self.cfg.novelty_threshold is not None and (self.training or self.cfg.insert_during_eval)

    def search(self, queries: torch.Tensor) -> tuple[QueryResult, Retrieved]:
        """Batched top-k search for ``queries (N, Dk)``; results on the queries' device and dtype."""
        result = self.store.query(queries.detach().float().cpu().numpy(), self.cfg.topk, reference=False)
        found = result.ids >= 0
        self.write("reference", result.ids[found])  # LRFU: every returned entry was referenced
        if found.any():
            self.last_topk_distance = float(result.distances[found].mean())

        def to_torch(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device=queries.device, dtype=queries.dtype)

        retrieved = Retrieved(
            ids=result.ids,
            valid=torch.from_numpy(found).to(queries.device),
            keys=to_torch(result.keys),
            values=to_torch(result.values),
            nearest=result.distances[:, 0],
        )
        return result, retrieved

    def insert_novel(self, nearest: np.ndarray, keys: torch.Tensor, values: torch.Tensor | None) -> None:
        """Insert the rows of ``keys (N, Dk)`` / ``values (N, Dv)`` whose nearest neighbour is far enough.

        ``values=None`` inserts zero values (featural layers learn them afterwards).
        """
        if not self.inserting:
            return
        novel = nearest > self.cfg.novelty_threshold  # +inf (no neighbour) is always novel
        if novel.any():
            mask = torch.from_numpy(novel).to(keys.device)
            new_keys = keys.detach()[mask].float().cpu().numpy()  # (M, Dk)
            new_values = (
                np.zeros((len(new_keys), self.entry_dim), dtype=np.float32)
                if values is None
                else values.detach()[mask].float().cpu().numpy()
            )  # (M, Dv)
            self.write("insert", new_keys, new_values)

    def maybe_recombine(self, result: QueryResult) -> None:
        if self.training and self.cfg.recombine_distance is not None:
            self.write("recombine", result, self.cfg.recombine_distance)

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Similarity ``(N, K)`` of each query to its neighbours, scaled by the temperature."""
        dist = distance(queries, keys, self.cfg.metric)
        # ip / cosine distances are 1 - similarity; l2 is a plain distance.
        similarity = -dist if self.cfg.metric == "l2" else 1.0 - dist
        return similarity / self.cfg.temperature

    def split_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``(B, T, H·dim) -> (B·T·H, dim)``"""
        return x.reshape(-1, dim)

    def merge_heads(self, x: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
        """``(B·T·H, Dv) -> (B, T, H·Dv)`` then the output projection to ``(B, T, C)``."""
        return self.out_proj(x.reshape(*batch_shape, self.heads * self.value_dim))

    def memory_stats(self) -> dict[str, float]:
        stats = self.store.stats
        return {
            "entries": float(len(self.store)),
            "inserts": float(stats.inserts),
            "evictions": float(stats.evictions),
            "merges": float(stats.merges),
            "mean_topk_distance": self.last_topk_distance,
        }

    def extra_repr(self) -> str:
        return (
            f"type={self.cfg.type}, heads={self.heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"topk={self.cfg.topk}, metric={self.cfg.metric}, capacity={self.cfg.capacity}"
        )


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix (U, D) ≈ coords (U, rank) @ basis (rank, D)`` by truncated SVD; exact when rank >= rank(M).

    When ``rank`` exceeds ``min(U, D)`` the factors are zero-padded so shapes stay as asked.
    """
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    r = min(rank, s.numel())
    coords = torch.zeros(matrix.shape[0], rank, dtype=torch.float64)
    basis = torch.zeros(rank, matrix.shape[1], dtype=torch.float64)
    coords[:, :r] = u[:, :r] * s[:r]
    basis[:r] = vh[:r]
    return coords.float(), basis.float()
