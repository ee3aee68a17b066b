"""Associative memory: tokens write their own key-value pairs and attend over the nearest stored ones."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmt.kernel.ops import fall_with_distance, neighbour_dots, neighbour_weights, null_score, within
from dmt.layers.base import MemoryLayer, Retrieved
from dmt.layers.config import AssociativeConfig
from dmt.layers.next_tokens import NextTokenRead, neighbour_distribution
from dmt.layers.protocol import current
from dmt.layers.straight_through import distances_straight_through, mix_values_straight_through


class AssociativeMemory(MemoryLayer):
    """query, key, value projections → top-k stored keys → insert the novel keys and values →
    attention of the queries over the returned keys and values → output projection.

    The search runs before this step's inserts, so a token never retrieves an entry written in the same
    forward (no leakage from later positions of the batch). Novelty is judged on the query's top-k
    distances, saving a second search. Gradients cross the index with the straight-through rules of
    :mod:`dmt.layers.straight_through`: the query projection and the key projection receive the gradient of
    the returned keys, the value projection that of the returned values; the returned values themselves are
    written back into the store (sparse SGD at ``value_lr``), as a featural memory's are.

    With ``keep_mlp`` the block's own MLP (:meth:`keep`) runs beside the memory and the two outputs add.
    What the caller hands a forward (:class:`~dmt.layers.protocol.MemoryProtocol`): with ``inserted_values:
    next_token`` the forward's input ids and the model's input embeddings; with ``mlp_output`` the teacher
    MLP's output.

    With ``next_token_weight`` > 0, an evaluation forward also searches the ``next_token_topk`` nearest
    and keeps their next tokens' distribution (:mod:`dmt.layers.next_tokens`) until the student's output
    hook takes it (:meth:`take_next_token_read`); the residual read uses the ``topk`` nearest of them.

    With ``init: ffn`` (:meth:`init_from_ffn`) the store starts with the replaced MLP's units and the
    attention weights are the MLP's activation of each score (times the gate for a gated MLP), so the layer
    starts as that MLP restricted to its top-k units; a token's own entry is then its projected key and
    value and, gated, its gate query scaled to unit length as the gate key.
    """

    cfg: AssociativeConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_proj = nn.Linear(self.d_model, self.heads * self.key_dim)
        self.value_proj = nn.Linear(self.d_model, self.heads * self.value_dim)
        with torch.no_grad():
            if self.cfg.init == "ffn":
                # The tokens' own entries start inert (zero key: score 0, weight act(0) = 0 for ReLU-like
                # activations; zero value) and grow from the straight-through gradients, so that the MLP's
                # units read as they did in the MLP instead of being outranked by new keys of another scale.
                for proj in (self.key_proj, self.value_proj):
                    nn.init.zeros_(proj.weight)
                    nn.init.zeros_(proj.bias)
            elif self.cfg.inserted_values != "projected":
                # A token's query starts equal to its key, so it finds what tokens like it stored.
                self.key_proj.load_state_dict(self.query_proj.state_dict())
            if self.cfg.inserted_values != "projected":
                # Residual-stream values: the output projection starts as output_gain × identity; by
                # default the stored vectors pass through unchanged, or, beside a kept MLP, start at zero so
                # that the student starts as the teacher.
                gain = self.cfg.output_gain
                if gain is None:
                    gain = 0.0 if self.cfg.keep_mlp else 1.0
                nn.init.eye_(self.out_proj.weight)
                self.out_proj.weight.mul_(gain)
                nn.init.zeros_(self.out_proj.bias)
            elif self.cfg.keep_mlp:  # the memory adds to the kept MLP: from zero, the student is the teacher
                nn.init.zeros_(self.out_proj.weight)
                nn.init.zeros_(self.out_proj.bias)
        # The block's own MLP, kept beside the memory (keep_mlp; set by keep()).
        self.register_module("mlp", None)
        # The next-token distribution of the latest evaluation forward, until the output hook takes it.
        self._next_token_read: NextTokenRead | None = None

    def keep(self, mlp: nn.Module) -> None:
        """Run ``mlp`` (the block's own MLP, ``keep_mlp``) beside the memory: the layer outputs their sum."""
        if not self.cfg.keep_mlp:
            raise ValueError("swap.output.keep_mlp is false: this layer replaces its block's MLP")
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = super().forward(hidden_states)  # (B, T, C)
        if self.mlp is not None:
            output = output + self.mlp(hidden_states)
        return output

    @property
    def reading_next_tokens(self) -> bool:
        """Whether a forward now mixes next tokens in (``next_token_weight`` > 0, evaluation)."""
        return self.cfg.next_token_weight > 0 and not self.training

    @property
    def searched_k(self) -> int:
        """``topk``, or as many as the next-token read takes when it reads (``next_token_topk``)."""
        if self.reading_next_tokens:
            return max(self.cfg.topk, self.cfg.next_token_topk or 0)
        return self.cfg.topk

    def take_next_token_read(self) -> NextTokenRead | None:
        """The next-token distribution of the latest forward (None: not reading next tokens); taken once."""
        read, self._next_token_read = self._next_token_read, None
        return read

    def read_next_tokens(self, found: Retrieved, device: torch.device) -> NextTokenRead:
        """The distribution of the next tokens of ``found``'s ``next_token_topk`` nearest neighbours."""
        cfg = self.cfg
        k = cfg.next_token_topk or cfg.topk
        tokens = torch.from_numpy(self.store.next_tokens(found.ids[:, :k])).to(device)  # (N, k)
        distances = torch.from_numpy(found.distances[:, :k]).to(device)  # (N, k)
        temperature = cfg.temperature if cfg.next_token_temperature is None else cfg.next_token_temperature
        return neighbour_distribution(
            distances, tokens, temperature, cfg.next_token_weight, self.heads, cfg.next_token_distance_scale
        )

    def next_token_values(
        self, nearest: np.ndarray, batch_shape: torch.Size
    ) -> tuple[torch.Tensor, np.ndarray]:
        """What ``inserted_values: next_token`` inserts: each token's successor's input embedding, split
        per head ``(N, Dv)``, and ``nearest (N,)`` with every row's last token made never novel (its
        successor is not in the batch).

        Raises:
            RuntimeError: the caller gave no input ids or input embeddings (MemoryProtocol.forward).
        """
        context = current()
        if context.token_ids is None or context.token_embeddings is None:
            raise RuntimeError(
                "swap.write.inserted_values=next_token: the layer needs the forward's input ids and the "
                "model's input embeddings to insert; run the model inside MemoryProtocol.forward(input_ids)"
            )
        token_ids = context.token_ids.to(self.out_proj.bias.device)  # (B, T)
        if tuple(token_ids.shape) != tuple(batch_shape):
            raise ValueError(
                f"token_ids of shape {tuple(token_ids.shape)} do not match the batch {tuple(batch_shape)}"
            )
        following = context.token_embeddings(token_ids[:, 1:]).detach().float()  # (B, T - 1, C)
        following = torch.cat([following, following.new_zeros(len(following), 1, following.shape[2])], 1)
        last = np.zeros((*batch_shape, self.heads), dtype=bool)  # (B, T, H)
        last[:, -1] = True
        return self.split_heads(following, self.value_dim), np.where(last.reshape(-1), -np.inf, nearest)

    def read_write(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]  # (B, T)
        queries = self.split_heads(self.query_proj(hidden_states), self.key_dim)  # (N, Dk)
        # The tokens' own keys and values feed inserts and the straight-through gradients: a forward that
        # does neither (reading a memorised pack) skips their projections.
        keys = values = None
        if self.inserting or torch.is_grad_enabled():
            keys = self.split_heads(self.key_proj(hidden_states), self.key_dim)  # (N, Dk)
            values = self.split_heads(self.value_proj(hidden_states), self.value_dim)  # (N, Dv)
        # Search: the topk nearest, or as many as the next-token read takes (the nearest topk of them read).
        found = self.search(queries, by_magnitude=self.cfg.ranking == "magnitude", k=self.searched_k)
        if self.reading_next_tokens:
            self._next_token_read = self.read_next_tokens(found, hidden_states.device)
        found = found.first(self.cfg.topk)
        distances = distances_straight_through(
            queries, keys, found.keys, found.rows, self.cfg.metric, found.searched
        )  # (N, K)
        scores = self.scores(distances)
        entries = self.learnable_entries(found)  # (U, Dv + G): value, then gate key
        gate_queries = self.gate_queries(hidden_states)  # (N, G); None ungated
        gate = (
            None
            if gate_queries is None
            else neighbour_dots(gate_queries, entries[:, self.value_dim :], found.rows)
        )
        null = null_score(self.cfg.null_distance, self.cfg.metric, self.cfg.temperature)
        valid = within(found.valid, distances, self.cfg.max_distance)  # (N, K)
        weights = neighbour_weights(scores, valid, self.cfg.weighting, gate, null)
        weights = fall_with_distance(weights, distances, found.valid, self.cfg.residual_distance_scale)
        attended = mix_values_straight_through(
            weights, found.rows, entries[:, : self.value_dim], values
        )  # (N, Dv)
        inserted, nearest = values, found.nearest
        target = current().insert_targets.get(self)  # (B, T, C): the teacher MLP's output, or None
        if target is not None and self.cfg.inserted_values == "mlp_output":
            inserted = self.split_heads(target, self.value_dim)  # (N, Dv)
        elif self.inserting and self.cfg.inserted_values == "next_token":
            inserted, nearest = self.next_token_values(nearest, batch_shape)  # (N, Dv), (N,)
        if gate_queries is not None and self.inserting:
            inserted = torch.cat([inserted, F.normalize(gate_queries, dim=1)], dim=1)  # (N, Dv + G)
        self.insert_novel(nearest, keys, inserted)
        self.maybe_recombine(found)
        return self.merge_heads(attended, batch_shape)  # (B, T, C)
