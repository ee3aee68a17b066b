"""Straight-through estimators across the (non-differentiable) nearest-neighbour search.

A search returns stored keys that are close to the query: ``key_returned ≈ query + noise``. The estimators
pass the gradient that reaches the returned tensors on to the tensors that produced them:

- ``dQuery = dKeyReturned``
- ``dKeyInserted = dKeyReturned``
- ``dValueInserted = dValueReturned``

where the gradient of the ``K`` returned neighbours of one query is summed over ``K``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmt.kernel.ops import mix_values, neighbour_distances, neighbour_dots, search_distances


def distances_straight_through(
    queries: torch.Tensor,
    keys: torch.Tensor | None,
    table: torch.Tensor,
    rows: torch.Tensor,
    metric: str,
    searched: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distances ``(N, K)`` of ``queries (N, Dk)`` to their returned keys ``table (U, Dk)[rows (N, K)]``,
    exact in the queries, with ``dQuery = dKeyInserted = Σ_k dKeyReturned`` added for ``queries`` and the
    keys this step inserts for the same tokens, ``keys (N, Dk)`` (None: a forward that writes nothing).
    A forward without gradients takes the distances the search reported, ``searched (N, K)`` (0 where no
    neighbour; :func:`~dmt.kernel.ops.search_distances`), when given.

    ``dKeyReturned[n, k] = dDistance[n, k] · ∂distance/∂key`` at ``(query n, returned key k)``; a zero-valued
    term ``<∂distance/∂key, shift_n>`` (``shift = Δquery + Δkey``, zero in the forward) gives ``shift`` that
    gradient summed over ``k``, without materialising the ``(N, K, Dk)`` returned keys:

    - ``ip``, ``1 - q·k``: ``∂/∂k = -q``;
    - ``l2``, ``||q - k||²``: ``∂/∂k = 2 (k - q)``;
    - ``cosine``, ``1 - q̂·k̂``: ``∂/∂k = (cos · k̂ - q̂) / ||k||``.
    """
    table = table.detach()
    if keys is None:
        keys = queries.detach()
    if not (torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad)):
        return search_distances(queries, table, rows, metric, searched)  # no zero-valued term to add
    distances = neighbour_distances(queries, table, rows, metric)  # (N, K)
    shift = (queries - queries.detach()) + (keys - keys.detach())  # (N, Dk), zeros
    point = queries.detach()
    if metric == "ip":
        term = -(point * shift).sum(1, keepdim=True)  # (N, 1), the same for every k
    elif metric == "l2":
        term = 2.0 * (neighbour_dots(shift, table, rows) - (point * shift).sum(1, keepdim=True))
    elif metric == "cosine":
        norms = table.norm(dim=1).clamp_min(1e-12)  # (U,)
        cosines = 1.0 - distances.detach()  # (N, K)
        along_key = neighbour_dots(shift, table / norms[:, None], rows)  # (N, K)
        along_query = (F.normalize(point, dim=1) * shift).sum(1, keepdim=True)  # (N, 1)
        term = (cosines * along_key - along_query) / norms[rows]
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return distances + term


def mix_values_straight_through(
    weights: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, value: torch.Tensor | None
) -> torch.Tensor:
    """``Σ_k weights[n, k] · values_ret[n, k]`` → ``(N, Dv)`` with ``values_ret = table (U, Dv)[rows (N, K)]``
    and ``dValueInserted = Σ_k dValueReturned`` for ``value (N, Dv)`` (None: a forward that writes nothing).

    ``dValueReturned[n, k] = weights[n, k] · dOut[n]``, so the rule gives ``value`` the gradient
    ``(Σ_k weights[n, k]) · dOut[n]``: adding ``(Σ_k weights) · (value - value.detach())`` (zero in the
    forward, zero in the weights' gradient) does that without materialising the ``(N, K, Dv)`` returns.
    """
    mixed = mix_values(weights, rows, table)
    if value is None:
        return mixed
    return mixed + weights.sum(dim=1, keepdim=True) * (value - value.detach())  # + (N, Dv) zeros
