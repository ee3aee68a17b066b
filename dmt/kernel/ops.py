"""The arithmetic of a memory layer's read: its projections, and scoring, weighting and mixing what a
search returned.

Given the rows of the entries a search returned, :func:`read_values` scores the neighbours, weights them
and mixes their values; :func:`read_projections` builds the dense (or parameter-free) projections around
it. ``dmt.layers`` builds its memory layers on these, and an export carries this file as it is
(:mod:`dmt.kernel`), so an exported student computes what the training layers compute.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# The activation weightings, by name (``gelu_tanh`` is GPT-2's tanh approximation of GELU).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}


# Scoring all (query, table row) pairs with one matmul beats gathering (N, K, D) neighbour rows while the
# table has at most this many rows per neighbour slot (a gathered row copy costs as much as many
# multiply-adds).
DENSE_SCORING_MAX_ROWS_PER_K = 32


def scored_densely(table: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether neighbours ``table (U, D)[rows (N, K)]`` are scored against the whole table (a small one)
    rather than gathered."""
    return table.shape[0] <= DENSE_SCORING_MAX_ROWS_PER_K * rows.shape[1]


def neighbour_dots(vectors: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``vectors (N, D)`` · ``table (U, D)[rows (N, K)]`` → ``(N, K)`` in the vectors' dtype (the table's
    rows are cast), differentiable in both."""
    if scored_densely(table, rows):
        return (vectors @ table.T.to(vectors.dtype)).gather(1, rows)  # (N, U) → (N, K)
    return torch.einsum("nd,nkd->nk", vectors, table[rows].to(vectors.dtype))


def neighbour_distances(
    queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, metric: str
) -> torch.Tensor:
    """Distance ``(N, K)`` of ``queries (N, D)`` to their neighbours ``keys (U, D)[rows (N, K)]``, in the
    conventions of :mod:`dmt.memory.metrics` (what the index reported, differentiable in the queries).
    Norms are taken of the neighbours only, unless the table is small (a large one is a store read in
    place)."""
    if not scored_densely(keys, rows):
        neighbours = keys[rows].to(queries.dtype)  # (N, K, D)
        if metric == "l2":
            dots = torch.einsum("nd,nkd->nk", queries, neighbours)
            return queries.pow(2).sum(1, keepdim=True) - 2.0 * dots + neighbours.pow(2).sum(2)
        if metric == "cosine":
            queries, neighbours = F.normalize(queries, dim=1), F.normalize(neighbours, dim=2)
        return 1.0 - torch.einsum("nd,nkd->nk", queries, neighbours)
    if metric == "l2":
        squared_norms = keys.pow(2).sum(1)[rows]  # (N, K)
        dots = neighbour_dots(queries, keys, rows)
        return queries.pow(2).sum(1, keepdim=True) - 2.0 * dots + squared_norms
    if metric == "cosine":
        queries = F.normalize(queries, dim=1)
        keys = F.normalize(keys, dim=1)
    return 1.0 - neighbour_dots(queries, keys, rows)


def search_distances(
    queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, metric: str, searched: torch.Tensor | None
) -> torch.Tensor:
    """Distances ``(N, K)`` of ``queries (N, D)`` to their neighbours ``keys (U, D)[rows (N, K)]``: the
    ``searched (N, K)`` distances the index reported (0 where no neighbour) when given and no gradient
    reaches the queries, else :func:`neighbour_distances`. Every index reports the exact distances of the
    keys it returns, so a read without gradients need not gather those keys again (a random gather from
    a large store)."""
    if searched is None or (torch.is_grad_enabled() and queries.requires_grad):
        return neighbour_distances(queries, keys, rows, metric)
    return searched.to(queries.dtype)


def neighbour_weights(
    scores: torch.Tensor,
    valid: torch.Tensor,
    weighting: str,
    gate: torch.Tensor | None = None,
    null_score: float | None = None,
) -> torch.Tensor:
    """Weights ``(N, K)`` of the neighbours from their ``scores (N, K)``; invalid neighbours get 0.

    ``softmax`` normalises over the neighbours and, given ``null_score``, a null entry of that score and a
    zero value: a query whose neighbours all score well below it reads almost nothing (the weights sum to
    less than 1). ``relu``/``gelu``/``gelu_tanh``/``silu`` apply the activation to each score
    independently, which makes a store seeded from an MLP's rows compute a top-k MLP. ``gate (N, K)``, if
    given, multiplies the weights (a gated, SwiGLU-like memory).
    """
    if weighting == "softmax":
        logits = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)  # (N, K)
        if null_score is not None:
            logits = torch.cat([logits, logits.new_full((len(logits), 1), null_score)], dim=1)  # (N, K + 1)
        weights = logits.softmax(dim=-1)[:, : scores.shape[1]]
    else:
        weights = ACTIVATIONS[weighting](scores)
    if gate is not None:
        weights = weights * gate
    return weights * valid  # rows without any neighbour sum to zero


def mix_values(weights: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``Σ_k weights[n, k] · table[rows[n, k]]`` → ``(N, Dv)`` in the weights' dtype for ``table (U, Dv)``.

    ``embedding_bag`` forms the sum without the ``(N, K, Dv)`` gather, forward and backward; the table's
    gradient comes back summed per row (one row per distinct entry). A table of another dtype (a store's
    float16 values, read in place) is summed in its own dtype, never copied whole.
    """
    if not table.is_contiguous():  # values sliced from wider rows: embedding_bag would copy the whole table
        used, rows = torch.unique(rows, return_inverse=True)
        table = table[used]  # (U', Dv), the rows read
    if table.dtype != weights.dtype:
        return F.embedding_bag(rows, table, per_sample_weights=weights.to(table.dtype), mode="sum").to(
            weights.dtype
        )
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


class AppendOne(nn.Module):
    """``x (..., C) → [x, 1] (..., C + 1)``: a parameter-free query whose constant lets a stored key carry
    a bias, as an MLP unit's input weights do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


class OutputBias(nn.Module):
    """``x → x + bias``: the output "projection" of a memory layer whose values are already ``d_model``
    wide; the bias is the replaced MLP's output bias (zero for Llama-family MLPs)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def similarity_scores(
    distances: torch.Tensor | float, metric: str, temperature: float
) -> torch.Tensor | float:
    """Similarity ``(N, K)`` of neighbours at ``distances (N, K)`` (a tensor or a number), divided by
    ``temperature``.

    ip and cosine distances are ``1 - similarity``; an l2 distance is its own negated similarity.
    """
    similarity = -distances if metric == "l2" else 1.0 - distances
    return similarity / temperature


def within(valid: torch.Tensor, distances: torch.Tensor, max_distance: float | None) -> torch.Tensor:
    """``valid (N, K)`` less the neighbours farther than ``max_distance`` (None: all stay): a query whose
    neighbours all lie beyond it reads nothing."""
    return valid if max_distance is None else valid & (distances.detach() <= max_distance)


def nearest_distance(distances: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N,)`` the distance of each query's nearest ``valid (N, K)`` neighbour of ``distances (N, K)``,
    +inf where none is valid."""
    return distances.masked_fill(~valid, float("inf")).amin(dim=1)


def fall_with_distance(
    weights: torch.Tensor, distances: torch.Tensor, valid: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """``weights (N, K)`` times ``exp(-d / scale)``, ``d`` each query's :func:`nearest_distance` (None: as
    they are): a query far from every entry, as text of another domain is from a pack, reads little, one
    near them reads as the weights say."""
    if scale is None:
        return weights
    # A cosine distance may round below 0: clamped, so that the factor never exceeds 1.
    nearest = nearest_distance(distances.detach(), valid).clamp_min(0.0)  # (N,)
    return weights * torch.exp(-nearest / scale)[:, None]


def null_score(null_distance: float | None, metric: str, temperature: float) -> float | None:
    """The softmax score of a null entry at ``null_distance`` from every query (None: no null entry)."""
    return None if null_distance is None else float(similarity_scores(null_distance, metric, temperature))


def read_projections(
    d_model: int, heads: int, key_dim: int, value_dim: int, gate_dim: int, dense: bool
) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """``(query_proj, out_proj, gate_query_proj)`` of a memory layer, made in this order (a seeded run's
    random weights depend on it).

    Dense: ``query_proj`` (C → H·Dk), ``out_proj`` (H·Dv → C) and, for gated entries (``gate_dim > 0``),
    ``gate_query_proj`` (C → H·G). Without dense weights the query is ``[x, 1]``, the output the mixed
    value plus a bias, and the gate query ``x`` itself; ``gate_query_proj`` is ``None`` for ungated entries.
    """
    if dense:
        query_proj: nn.Module = nn.Linear(d_model, heads * key_dim)
        out_proj: nn.Module = nn.Linear(heads * value_dim, d_model)
    else:
        query_proj, out_proj = AppendOne(), OutputBias(d_model)
    gate_query_proj: nn.Module | None = None
    if gate_dim:
        gate_query_proj = nn.Linear(d_model, heads * gate_dim) if dense else nn.Identity()
    return query_proj, out_proj, gate_query_proj


def read_values(
    queries: torch.Tensor,
    keys: torch.Tensor,
    entries: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor,
    *,
    metric: str,
    temperature: float,
    weighting: str,
    value_dim: int,
    gate_queries: torch.Tensor | None = None,
    null_distance: float | None = None,
    max_distance: float | None = None,
    distance_scale: float | None = None,
    searched: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``queries (N, Dk)`` read from their neighbours ``keys (U, Dk)[rows (N, K)]``: ``(N, Dv)``.

    ``entries (U, Dv + G)`` hold each neighbour's value, then (gated entries) its gate key, dotted with
    ``gate_queries (N, G)``; ``valid (N, K)`` marks real neighbours; ``null_distance``: the softmax's null
    entry (:func:`neighbour_weights`), as a distance from every query; ``max_distance``: neighbours farther
    are not read (:func:`within`); ``distance_scale``: the weights fall with the nearest neighbour's distance
    (:func:`fall_with_distance`); ``searched (N, K)``: the distances the search reported, 0 where no
    neighbour (:func:`search_distances`). Differentiable in the queries, the gate queries and the entries
    (the keys are the store's constants).
    """
    distances = search_distances(queries, keys, rows, metric, searched)  # (N, K)
    read = within(valid, distances, max_distance)
    scores = similarity_scores(distances, metric, temperature)
    gate = None if gate_queries is None else neighbour_dots(gate_queries, entries[:, value_dim:], rows)
    null = null_score(null_distance, metric, temperature)
    weights = neighbour_weights(scores, read, weighting, gate, null)  # (N, K)
    weights = fall_with_distance(weights, distances, valid, distance_scale)
    return mix_values(weights, rows, entries[:, :value_dim])  # (N, Dv)
