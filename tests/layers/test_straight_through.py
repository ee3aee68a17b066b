"""Straight-through rules: dQuery = dKeyRet, dKeyInserted = dKeyRet, dValueInserted = dValueRet."""

import pytest
import torch
from torch.testing import assert_close

from dmt.layers.straight_through import distances_straight_through, mix_values_straight_through


def materialised_distances(query, key, keys_ret, metric):
    """Reference: distances to the ``(N, K, Dk)`` returned keys, their gradient routed by hand to the query
    and the inserted key (dQuery = dKeyInserted = Σ_k dKeyReturned, beside the query's own exact one)."""

    class Route(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, ret):
            return ret.view_as(ret)

        @staticmethod
        def backward(ctx, grad):
            return grad.sum(1), grad.sum(1), None

    ret = Route.apply(query, key, keys_ret)
    q = query[:, None, :]
    if metric == "l2":
        return (q - ret).pow(2).sum(-1)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(q, ret, dim=-1)
    return 1.0 - (q * ret).sum(-1)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_distances_pass_the_returned_keys_gradient_to_query_and_inserted_key(metric):
    torch.manual_seed(0)
    n, k, u, dk = 5, 3, 7, 4
    table = torch.randn(u, dk, dtype=torch.double)
    rows = torch.randint(0, u, (n, k))
    query = torch.randn(n, dk, dtype=torch.double, requires_grad=True)
    key = torch.randn(n, dk, dtype=torch.double, requires_grad=True)
    out = distances_straight_through(query, key, table, rows, metric)
    expected = materialised_distances(query, key, table[rows], metric)
    assert_close(out, expected)
    upstream = torch.randn(n, k, dtype=torch.double)
    grads = torch.autograd.grad((out * upstream).sum(), (query, key))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key))
    assert_close(grads[0], expected_grads[0])
    assert_close(grads[1], expected_grads[1])
    assert grads[1].abs().sum() > 0  # the inserted key does learn


def test_mixed_values_follow_the_rule_as_if_the_returns_were_materialised():
    # Reference: the (N, K, Dv) returned values as a tensor whose gradient is routed to `value` by hand.
    torch.manual_seed(0)
    n, k, u, dv = 5, 3, 4, 6
    table = torch.randn(u, dv)
    rows = torch.randint(0, u, (n, k))
    weights = torch.rand(n, k, requires_grad=True)
    value = torch.randn(n, dv, requires_grad=True)
    out = mix_values_straight_through(weights, rows, table, value)
    values_ret = table[rows].requires_grad_(True)  # (N, K, Dv)
    expected = torch.einsum("nk,nkd->nd", weights, values_ret)
    assert_close(out, expected)

    upstream = torch.randn(n, dv)
    d_weights, d_value = torch.autograd.grad((out * upstream).sum(), (weights, value))
    d_weights_ref, d_values_ret = torch.autograd.grad((expected * upstream).sum(), (weights, values_ret))
    assert_close(d_weights, d_weights_ref)
    assert_close(d_value, d_values_ret.sum(1))  # dValueInserted = Σ_k dValueReturned


def test_gradcheck_of_the_mix():
    weights = torch.rand(2, 5, dtype=torch.double, requires_grad=True)
    table = torch.randn(4, 3, dtype=torch.double)
    rows = torch.randint(0, 4, (2, 5))
    value = torch.randn(2, 3, dtype=torch.double)
    # Only the weights get a true Jacobian: value's gradient is the estimator's, by design.
    assert torch.autograd.gradcheck(lambda w: mix_values_straight_through(w, rows, table, value), (weights,))
