"""Associative memory: tokens write their own key-value pairs and attend over the nearest stored ones."""

from __future__ import annotations

import torch
from torch import nn

from dmt.layers.base import MemoryLayer
from dmt.layers.config import AssociativeConfig
from dmt.layers.straight_through import mix_values_straight_through, returned_keys_straight_through
from dmt.remote_code.memory_ops import neighbour_distances, neighbour_weights


class AssociativeMemory(MemoryLayer):
    """query, key, value projections → top-k stored keys → insert the novel keys and values →
    attention of the queries over the returned keys and values → output projection.

    The search runs before this step's inserts, so a token never retrieves an entry written in the same
    forward (no leakage from later positions of the batch). Novelty is judged on the query's top-k
    distances, saving a second search. Gradients cross the index with the straight-through rules of
    :mod:`dmt.layers.straight_through`: the query projection and the key projection receive the gradient of
    the returned keys, the value projection that of the returned values; the returned values themselves are
    written back into the store (sparse SGD at ``value_lr``), as a featural memory's are.
    """

    cfg: AssociativeConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_proj = nn.Linear(self.d_model, self.heads * self.key_dim)
        self.value_proj = nn.Linear(self.d_model, self.heads * self.value_dim)
        if self.cfg.inserted_values == "mlp_output":
            with torch.no_grad():
                # A token's query starts equal to its key, so it finds what tokens like it stored, and the
                # stored MLP outputs pass through the output projection unchanged.
                self.key_proj.load_state_dict(self.query_proj.state_dict())
                nn.init.eye_(self.out_proj.weight)
                nn.init.zeros_(self.out_proj.bias)
        # The teacher MLP's outputs (B, T, C) for the forward in progress, set by the training loop
        # (inserted_values: mlp_output); None: values are projected.
        self.insert_targets: torch.Tensor | None = None

    def read_write(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]  # (B, T)
        queries = self.split_heads(self.query_proj(hidden_states), self.key_dim)  # (N, Dk)
        keys = self.split_heads(self.key_proj(hidden_states), self.key_dim)  # (N, Dk)
        values = self.split_heads(self.value_proj(hidden_states), self.value_dim)  # (N, Dv)
        found = self.search(queries)
        keys_ret = returned_keys_straight_through(queries, keys, found.keys[found.rows])  # (N, K, Dk)
        # Each query's own returned keys as a table: row n·K + k is its k-th neighbour.
        own_rows = torch.arange(keys_ret.shape[0] * keys_ret.shape[1], device=queries.device)
        distances = neighbour_distances(
            queries, keys_ret.flatten(0, 1), own_rows.view(found.rows.shape), self.cfg.metric
        )  # (N, K)
        scores = self.scores(distances)
        weights = neighbour_weights(scores, found.valid, "softmax")
        entries = self.learnable_entries(found)  # (U, Dv)
        attended = mix_values_straight_through(weights, found.rows, entries, values)  # (N, Dv)
        inserted = values
        if self.insert_targets is not None and self.cfg.inserted_values == "mlp_output":
            inserted = self.split_heads(self.insert_targets, self.value_dim)  # (N, Dv)
        self.insert_novel(found.nearest, keys, inserted)
        self.maybe_recombine(found)
        return self.merge_heads(attended, batch_shape)  # (B, T, C)
