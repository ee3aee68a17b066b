"""Featural memory: a learned query searches a store of fixed feature keys with learnable values."""

from __future__ import annotations

import torch
from torch import nn

from dmt.layers.base import MemoryLayer, low_rank_factors
from dmt.layers.config import FeaturalConfig
from dmt.layers.mlp import FFNWeights
from dmt.memory import KNNStore
from dmt.remote_code.memory_ops import mix_values, neighbour_distances, neighbour_dots, neighbour_weights


class FeaturalMemory(MemoryLayer):
    """query projection → top-k stored keys → distance-weighted sum of their values → output projection.

    Gradients: the query projection learns through the distances to the returned keys (exact given the
    retrieved set — the keys are constants of the store). The returned entries are written back into the
    store by :meth:`~dmt.layers.base.MemoryLayer.apply_value_updates` (sparse SGD at ``value_lr``), the way
    an embedding table with sparse gradients learns. With ``novelty_threshold`` set, queries far from every
    stored key are inserted as new keys with zero values, which the value updates then fill in.
    """

    cfg: FeaturalConfig

    def __init__(self, d_model: int, cfg: FeaturalConfig, store: KNNStore | None = None) -> None:
        super().__init__(d_model, cfg, store)
        self.gate_query_proj: nn.Module | None = None
        if cfg.gate_dim and cfg.dense_weights:
            self.gate_query_proj = nn.Linear(self.d_model, self.heads * cfg.gate_dim)
        elif cfg.gate_dim:
            self.gate_query_proj = nn.Identity()  # the gate query is the hidden state itself

    def read_write(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]  # (B, T)
        queries = self.split_heads(self.query_proj(hidden_states), self.key_dim)  # (N, Dk)
        found = self.search(queries, by_magnitude=self.cfg.ranking == "magnitude")
        entries = self.learnable_entries(found)  # (U, Dv + G): value, then gate key
        gate = None
        if self.gate_query_proj is not None:
            gate_queries = self.split_heads(self.gate_query_proj(hidden_states), self.cfg.gate_dim)  # (N, G)
            gate = neighbour_dots(gate_queries, entries[:, self.value_dim :], found.rows)  # (N, K)
        distances = neighbour_distances(queries, found.keys, found.rows, self.cfg.metric)  # (N, K)
        weights = neighbour_weights(self.scores(distances), found.valid, self.cfg.weighting, gate)
        mixed = mix_values(weights, found.rows, entries[:, : self.value_dim])  # (N, Dv)
        self.insert_novel(found.nearest, queries, values=None)
        self.maybe_recombine(found)
        return self.merge_heads(mixed, batch_shape)  # (B, T, C)

    @torch.no_grad()
    def init_from_ffn(self, ffn: FFNWeights) -> None:
        """Seed the store from the MLP it replaces, read as a key-value memory (Geva et al., 2021).

        ``MLP(x) = Σ_u act(k_u·x + b_u) v_u + b_out`` for ``keys (U, C)``, ``key_bias (U,)``,
        ``values (U, C)``. The bias is folded in by appending a constant 1 to ``x``; the query projection
        and stored keys are the truncated SVD of ``[keys | bias]`` (exact when ``key_dim >= C + 1``), the
        output projection and stored values that of ``values`` (exact when ``value_dim >= C``). With an
        inner-product store and the MLP's activation as ``weighting`` (what :meth:`FeaturalConfig.resolved`
        derives), the layer then computes the MLP restricted to its top-k units. A gated MLP
        ``Σ_u act(k_u·x) (g_u·x) v_u`` (SwiGLU) also has ``gate_keys (U, C)``; with ``gate_dim >= C`` the
        gated layer reproduces it the same way. Without dense weights the store takes the MLP's rows as
        they are.
        """
        form = ffn.form
        if self.heads != 1:
            raise ValueError("swap.init=ffn needs swap.heads=1")
        if form.units > self.store.capacity:
            raise ValueError(f"swap.capacity={self.store.capacity} cannot hold the MLP's {form.units} units")
        if form.activation != self.cfg.weighting:
            raise ValueError(
                f"swap.weighting={self.cfg.weighting!r} does not compute the {form.activation} MLP"
            )
        if form.gated != (self.gate_query_proj is not None):
            raise ValueError(
                f"swap.gate_dim={self.cfg.gate_dim} does not fit a {'' if form.gated else 'non-'}gated MLP"
            )
        keys, values, gate_keys = ffn.keys, ffn.values, ffn.gate_keys
        bias = ffn.key_bias if ffn.key_bias is not None else keys.new_zeros(form.units)
        augmented = torch.cat([keys, bias[:, None]], dim=1)  # (U, C + 1)
        units = torch.arange(form.units).numpy()  # (U,): entry u is seeded from unit u
        self.out_proj.bias.copy_(ffn.out_bias if ffn.out_bias is not None else torch.zeros(form.d_model))
        if not self.cfg.dense_weights:  # the store holds the MLP's own rows
            entries = values if gate_keys is None else torch.cat([values, gate_keys], dim=1)
            self.store.insert(augmented.numpy(), entries.numpy(), origin_units=units)
            return
        key_coords, key_basis = low_rank_factors(augmented, self.key_dim)  # (U, Dk), (Dk, C + 1)
        self.query_proj.weight.copy_(key_basis[:, : form.d_model])
        self.query_proj.bias.copy_(key_basis[:, form.d_model])
        value_coords, value_basis = low_rank_factors(values, self.value_dim)  # (U, Dv), (Dv, C)
        self.out_proj.weight.copy_(value_basis.T)
        entries = value_coords  # (U, Dv)
        if gate_keys is not None:
            gate_coords, gate_basis = low_rank_factors(gate_keys, self.cfg.gate_dim)  # (U, G), (G, C)
            self.gate_query_proj.weight.copy_(gate_basis)
            self.gate_query_proj.bias.zero_()
            entries = torch.cat([value_coords, gate_coords], dim=1)  # (U, Dv + G)
        self.store.insert(key_coords.numpy(), entries.numpy(), origin_units=units)
