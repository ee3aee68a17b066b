"""A saved student's swapped layers, reading only: what an export builds in place of the replaced MLPs.

Each is built from the layer's saved settings (the flat ``to_dict()`` of its ``dmt.layers.config``
dataclass) and, for a dense baseline, the replaced MLP's form (``dmt.layers.mlp.MLPForm`` as a dict), with
the weight names of dmt's own layers, so a student's weights load as they are. A memory layer here reads
what dmt's layer reads in evaluation (the projections and read of :mod:`.ops`), with two differences: nothing
is inserted (a fixed memory), and the search is exact (:mod:`.search`), so a student trained with an
approximate (hnsw) index may see slightly different neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .dense import LowRankMLP, RemovedMLP
from .ops import ACTIVATIONS, read_projections, read_values
from .search import search_table, table_rows


class MemoryRead(nn.Module):
    """A featural or associative memory layer over fixed entries: ``(B, T, C) → (B, T, C)``.

    Until :meth:`load_entries` the memory is empty and the layer outputs its output bias. ``mlp``: the
    block's own MLP, run beside the memory where the layer kept it (``keep_mlp``); the outputs add.
    """

    def __init__(self, d_model: int, settings: Mapping[str, Any], mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = settings["type"]
        if settings.get("next_token_weight", 0.0) > 0:
            raise ValueError(
                "next_token_weight: this memory mixes its next tokens into the output, which the "
                "transformers path does not do; load it with dmt.load_pretrained, or save it with "
                "next_token_weight 0"
            )
        self.heads, self.key_dim, self.value_dim = (
            settings["heads"],
            settings["key_dim"],
            settings["value_dim"],
        )
        self.gate_dim = settings["gate_dim"] or 0
        self.topk, self.metric, self.temperature = (
            settings["topk"],
            settings["metric"],
            settings["temperature"],
        )
        self.weighting, self.by_magnitude = settings["weighting"], settings["ranking"] == "magnitude"
        # A student saved before null entries existed has none.
        self.null_distance, self.max_distance = settings.get("null_distance"), settings.get("max_distance")
        self.residual_distance_scale = settings.get("residual_distance_scale")
        # Only featural layers can drop their dense weights.
        dense = settings.get("dense_weights", True)
        self.query_proj, self.out_proj, self.gate_query_proj = read_projections(
            d_model, self.heads, self.key_dim, self.value_dim, self.gate_dim, dense
        )
        if self.kind == "associative":
            # Only inserts use them; kept so that the student's weights load whole and can be inspected.
            self.key_proj = nn.Linear(d_model, self.heads * self.key_dim)
            self.value_proj = nn.Linear(d_model, self.heads * self.value_dim)
        self.mlp = None
        if settings.get("keep_mlp", False):
            if mlp is None:
                raise ValueError("a memory kept beside its block's MLP needs that MLP")
            self.mlp = mlp
        # The entries, as buffers that follow .to(): the search table (H, Dk + 1) of the live keys, and the
        # keys (H, Dk) and entries (H, Dv + G) as the store holds them (float16 values stay float16).
        self.register_buffer("table", torch.zeros(0, self.key_dim + 1), persistent=False)
        self.register_buffer("keys", torch.zeros(0, self.key_dim), persistent=False)
        self.register_buffer("entries", torch.zeros(0, self.value_dim + self.gate_dim), persistent=False)
        self.live = 0

    def load_entries(self, keys: torch.Tensor, entries: torch.Tensor, live: torch.Tensor) -> None:
        """Hold a store's rows ``keys (H, Dk)``, ``entries (H, Dv + G)`` and ``live (H,)`` (bool), on the
        device of the layer's parameters."""
        device = self.out_proj.bias.device
        self.keys, self.entries, live = keys.to(device), entries.to(device), live.to(device)
        self.table = table_rows(self.keys.float(), self.metric)  # (H, Dk + 1)
        self.table[~live, self.key_dim] = float("inf")  # free rows are never returned
        self.live = int(live.sum())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]  # (B, T)

        # Exact search
        queries = self.query_proj(hidden_states).reshape(-1, self.key_dim)  # (N, Dk), N = B·T·heads
        ids, distances = search_table(
            queries.detach().float(), self.table, self.topk, self.live, self.metric, self.by_magnitude
        )

        # Read in place: the neighbours' rows of the held entries; padding (-1) reads row 0 at weight 0
        keys, entries = self.keys, self.entries  # (H, Dk), (H, Dv + G)
        if not self.live:  # an empty memory: every neighbour is padding
            keys = queries.new_zeros(1, self.key_dim)
            entries = queries.new_zeros(1, self.value_dim + self.gate_dim)
        rows = ids.clamp_min(0)  # (N, K)

        # Weighted read
        gate_queries = None
        if self.gate_query_proj is not None:
            gate_queries = self.gate_query_proj(hidden_states).reshape(-1, self.gate_dim)  # (N, G)
        mixed = read_values(
            queries,
            keys,
            entries,
            rows,
            ids >= 0,
            metric=self.metric,
            temperature=self.temperature,
            weighting=self.weighting,
            value_dim=self.value_dim,
            gate_queries=gate_queries,
            null_distance=self.null_distance,
            max_distance=self.max_distance,
            distance_scale=self.residual_distance_scale,
            searched=distances.masked_fill(ids < 0, 0.0),
        )  # (N, Dv)
        output = self.out_proj(mixed.reshape(*batch_shape, self.heads * self.value_dim))  # (B, T, C)
        return output if self.mlp is None else output + self.mlp(hidden_states)


def swapped_module(
    d_model: int, settings: Mapping[str, Any], mlp_form: Mapping[str, Any], mlp: nn.Module | None = None
) -> nn.Module:
    """The module that stands in for a block's MLP ``mlp`` of form ``mlp_form``, per ``settings["type"]``."""
    kind = settings["type"]
    if kind in ("featural", "associative"):
        return MemoryRead(d_model, settings, mlp)
    if kind == "removed":
        return RemovedMLP()
    if kind == "lowrank":
        return LowRankMLP(
            d_model,
            settings["rank"],
            gated=mlp_form["gated"],
            key_bias=mlp_form["key_bias"],
            out_bias=mlp_form["out_bias"],
            act=ACTIVATIONS[mlp_form["activation"]],
        )
    raise ValueError(f"unknown layer type {kind!r}")
