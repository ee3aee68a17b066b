"""Next tokens as a distribution: what followed a memory layer's nearest entries, mixed into the model's
output probabilities as kNN-LM mixes its neighbours' next tokens (Khandelwal et al. 2020).

A ``next_token`` cache adds its neighbours' next-token embeddings to the residual stream, so a retrieved
token only nudges every token whose embedding is near it. With ``next_token_weight`` λ > 0 an associative
layer, in evaluation, also hands over the tokens that followed its ``next_token_topk`` nearest entries
(each entry's provenance, :meth:`~dmt.memory.store.KNNStore.next_tokens`) with softmax weights
(:func:`neighbour_distribution`); a forward hook on the student
(:func:`dmt.model.surgery.mix_next_token_reads`) returns

    log((1 - Σλ) softmax(logits) + Σ λ p_memory)

as the logits, one λ and ``p_memory`` per layer, so a retrieved token can win outright. A query none of
whose neighbours has a known next token mixes nothing (its λ is 0). A fixed λ hands that share of every
position to the memory, near neighbours or far; with ``next_token_distance_scale`` ``s`` a query's λ falls
as ``λ exp(-d / s)`` with the distance ``d`` of its nearest neighbour of known next token (an adaptive
kNN-LM), so a pack of one domain stays quiet on text of another, whose queries find only far entries. The
mix reads its ``next_token_topk`` neighbours whatever the layer's ``max_distance``, which bounds the
residual read alone. The logits become float32 log-probabilities: a cross-entropy over them is the
mixture's negative log-likelihood, and generation samples from the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmt.kernel.ops import nearest_distance


@dataclass(frozen=True)
class NextTokenRead:
    """One layer's next-token distribution for the ``N = B·T·H`` queries of a forward."""

    weights: torch.Tensor  # (N, K) float32: softmax over the neighbours with a known next token, 0 elsewhere
    tokens: torch.Tensor  # (N, K) int64: each neighbour's next token (0 where unknown, at weight 0)
    lam: torch.Tensor  # (N,) float32: the query's λ (0 for a query without a neighbour of known next token)
    heads: int  # H: a token's distribution is the mean of its heads'


def neighbour_distribution(
    distances: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    weight: float,
    heads: int,
    distance_scale: float | None = None,
) -> NextTokenRead:
    """The next-token read of neighbours at ``distances (N, K)`` (+inf: none) whose next tokens are
    ``tokens (N, K)`` (-1: unknown): a softmax of ``-distance / temperature`` over the known ones, mixed
    with λ = ``weight``, or ``weight · exp(-nearest / distance_scale)`` for the distance of the nearest
    known one (None: a fixed λ); 0 where none is known."""
    known = (tokens >= 0) & torch.isfinite(distances)  # (N, K)
    scores = (-distances.float() / temperature).masked_fill(~known, float("-inf"))
    weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a row with none known: all 0, not NaN
    nearest = nearest_distance(distances.float(), known)  # (N,) +inf: none known
    if distance_scale is None:
        lam = torch.isfinite(nearest).float() * weight  # (N,)
    else:
        # A cosine distance may round below 0: clamped, so that λ never exceeds weight.
        lam = weight * torch.exp(-nearest.clamp_min(0.0) / distance_scale)  # (N,) exp(-inf) = 0: none known
    return NextTokenRead(weights, tokens.clamp_min(0), lam, heads)


def mix_next_tokens(logits: torch.Tensor, reads: list[NextTokenRead]) -> torch.Tensor:
    """``log((1 - Σλ) softmax(logits) + Σ λ p_read)``, ``(B, T, V)`` float32, for ``logits (B, T, V)``.

    A read of ``B·T'·H`` queries with ``T' >= T`` covers the last ``T`` positions of each row (a model that
    computes the logits of its last positions only, as generation does). ``p_read`` is never built dense:
    only the ``(position, token)`` pairs the neighbours name change.
    """
    batch, length, vocab = logits.shape
    mixed = torch.log_softmax(logits.float(), dim=-1).reshape(-1, vocab)  # (B·T, V)
    rest = torch.ones(batch * length, device=logits.device)  # 1 - Σλ per position
    rows = torch.arange(batch * length, device=logits.device)[:, None]  # (B·T, 1)
    slots, masses = [], []
    for read in reads:
        weights, tokens, lam = (
            last_positions(t.to(logits.device), batch, length, read.heads)
            for t in (read.weights, read.tokens, read.lam)
        )  # (B·T, H·K), (B·T, H·K), (B·T, H)
        rest = rest - lam.mean(dim=1)
        heads_lam = lam.repeat_interleave(weights.shape[1] // read.heads, dim=1) / read.heads  # (B·T, H·K)
        masses.append((weights * heads_lam).reshape(-1))
        slots.append((rows * vocab + tokens).reshape(-1))
    mixed = mixed + rest.clamp_min(1e-12).log()[:, None]
    if slots:  # each (position, token) named by a neighbour: logaddexp with its memory mass
        where, inverse = torch.unique(torch.cat(slots), return_inverse=True)
        mass = torch.zeros(len(where), device=logits.device).index_add_(0, inverse, torch.cat(masses))
        flat = mixed.view(-1)
        flat[where] = torch.logaddexp(flat[where], mass.log())
    return mixed.reshape(batch, length, vocab)


def last_positions(rows: torch.Tensor, batch: int, length: int, heads: int) -> torch.Tensor:
    """``rows (B·T'·H, ...)`` of a forward's queries as ``(B·T, H·...)``: the last ``T`` of ``T'`` positions
    of each of the ``B`` rows, a position's heads side by side.

    Raises:
        RuntimeError: ``rows`` do not split into ``B`` rows of at least ``T`` positions (a read of another
            forward).
    """
    per_row, remainder = divmod(len(rows), batch * heads)
    if remainder or per_row < length:
        raise RuntimeError(
            f"next-token read of {len(rows)} queries does not cover logits of {batch} x {length} positions "
            f"with {heads} head(s): it belongs to another forward"
        )
    shaped = rows.reshape(batch, per_row, heads, *rows.shape[1:])[:, per_row - length :]
    return shaped.reshape(batch * length, -1)
