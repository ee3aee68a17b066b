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


class RetrievalStraightThrough(Function):
    """Identity on the returned keys and values, straight-through gradients to query, key and value.

    Forward: ``(query (N, Dk), key (N, Dk), value (N, Dv), keys_ret (N, K, Dk), values_ret (N, K, Dv))``
    → ``(keys_ret, values_ret)``. ``key`` and ``value`` are the entries this step inserts for the same
    tokens as ``query``.
    """

    @staticmethod
    def forward(ctx, query, key, value, keys_ret, values_ret):  # type: ignore[override]
        # view_as: outputs must be new tensor objects for autograd to attach this node to them.
        return keys_ret.view_as(keys_ret), values_ret.view_as(values_ret)

    @staticmethod
    def backward(ctx, grad_keys_ret, grad_values_ret):  # type: ignore[override]
        d_key = grad_keys_ret.sum(dim=1)  # (N, Dk)
        d_value = grad_values_ret.sum(dim=1)  # (N, Dv)
        return d_key, d_key, d_value, None, None


def retrieve_straight_through(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys_ret: torch.Tensor,
    values_ret: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returned ``(keys (N, K, Dk), values (N, K, Dv))`` carrying straight-through gradients."""
    return RetrievalStraightThrough.apply(query, key, value, keys_ret, values_ret)
