"""Featural memory: a learned query searches a store of fixed feature keys with learnable values."""

from __future__ import annotations

import torch

from dmt.kernel.ops import read_values
from dmt.layers.base import MemoryLayer
from dmt.layers.config import FeaturalConfig


class FeaturalMemory(MemoryLayer):
    """query projection → top-k stored keys → distance-weighted sum of their values → output projection.

    Gradients: the query projection learns through the distances to the returned keys (exact given the
    retrieved set — the keys are constants of the store). The returned entries are written back into the
    store by :meth:`~dmt.layers.base.MemoryLayer.apply_value_updates` (sparse SGD at ``value_lr``), the way
    an embedding table with sparse gradients learns. With ``novelty_threshold`` set, queries far from every
    stored key are inserted as new keys with zero values, which the value updates then fill in.
    """

    cfg: FeaturalConfig

    def read_write(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]  # (B, T)
        queries = self.split_heads(self.query_proj(hidden_states), self.key_dim)  # (N, Dk)
        found = self.search(queries, by_magnitude=self.cfg.ranking == "magnitude")
        entries = self.learnable_entries(found)  # (U, Dv + G): value, then gate key
        mixed = read_values(
            queries,
            found.keys,
            entries,
            found.rows,
            found.valid,
            metric=self.cfg.metric,
            temperature=self.cfg.temperature,
            weighting=self.cfg.weighting,
            value_dim=self.value_dim,
            gate_queries=self.gate_queries(hidden_states),
            searched=found.searched,
        )  # (N, Dv)
        self.insert_novel(found.nearest, queries, values=None)
        self.maybe_recombine(found)
        return self.merge_heads(mixed, batch_shape)  # (B, T, C)
