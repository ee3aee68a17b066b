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
from torch.autograd import Function

from dmt.remote_code.memory_ops import mix_values


class ReturnedKeysStraightThrough(Function):
    """Identity on the returned keys, straight-through gradients to the query and the inserted key.

    Forward: ``(query (N, Dk), key (N, Dk), keys_ret (N, K, Dk))`` → ``keys_ret``. ``key`` is the entry this
    step inserts for the same token as ``query``.
    """

    @staticmethod
    def forward(ctx, query, key, keys_ret):  # type: ignore[override]
        # view_as: outputs must be new tensor objects for autograd to attach this node to them.
        return keys_ret.view_as(keys_ret)

    @staticmethod
    def backward(ctx, grad_keys_ret):  # type: ignore[override]
        d_key = grad_keys_ret.sum(dim=1)  # (N, Dk)
        return d_key, d_key, None


def returned_keys_straight_through(
    query: torch.Tensor, key: torch.Tensor, keys_ret: torch.Tensor
) -> torch.Tensor:
    """Returned ``keys (N, K, Dk)`` carrying ``dQuery = dKeyInserted = Σ_k dKeyReturned``."""
    return ReturnedKeysStraightThrough.apply(query, key, keys_ret)


def mix_values_straight_through(
    weights: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``Σ_k weights[n, k] · values_ret[n, k]`` → ``(N, Dv)`` with ``values_ret = table (U, Dv)[rows (N, K)]``
    and ``dValueInserted = Σ_k dValueReturned`` for ``value (N, Dv)``.

    ``dValueReturned[n, k] = weights[n, k] · dOut[n]``, so the rule gives ``value`` the gradient
    ``(Σ_k weights[n, k]) · dOut[n]``: adding ``(Σ_k weights) · (value - value.detach())`` (zero in the
    forward, zero in the weights' gradient) does that without materialising the ``(N, K, Dv)`` returns.
    """
    straight_through = weights.sum(dim=1, keepdim=True) * (value - value.detach())  # (N, Dv), zeros
    return mix_values(weights, rows, table) + straight_through
