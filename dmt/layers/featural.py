"""Featural memory: a learned query searches a store of fixed feature keys with learnable values."""

from __future__ import annotations

import torch

from dmt.layers.base import MemoryLayer
from dmt.layers.config import FeaturalConfig
from dmt.remote_code.memory_ops import mix_values, neighbour_distances, neighbour_weights


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
        _, gate = self.gate(hidden_states, entries, found)
        distances = neighbour_distances(queries, found.keys, found.rows, self.cfg.metric)  # (N, K)
        weights = neighbour_weights(self.scores(distances), found.valid, self.cfg.weighting, gate)
        mixed = mix_values(weights, found.rows, entries[:, : self.value_dim])  # (N, Dv)
        self.insert_novel(found.nearest, queries, values=None)
        self.maybe_recombine(found)
        return self.merge_heads(mixed, batch_shape)  # (B, T, C)
