"""Straight-through rules: dQuery = dKeyRet, dKeyInserted = dKeyRet, dValueInserted = dValueRet."""

import torch
from torch.testing import assert_close

from dmt.layers.straight_through import mix_values_straight_through, returned_keys_straight_through


def test_returned_keys_pass_their_gradient_to_query_and_inserted_key():
    torch.manual_seed(0)
    n, k, dk = 3, 4, 5
    query = torch.randn(n, dk, requires_grad=True)
    key = torch.randn(n, dk, requires_grad=True)
    keys_ret = torch.randn(n, k, dk)
    out = returned_keys_straight_through(query, key, keys_ret)
    assert_close(out, keys_ret)
    grad = torch.randn(n, k, dk)
    (out * grad).sum().backward()
    assert_close(query.grad, grad.sum(1))
    assert_close(key.grad, grad.sum(1))


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


def test_gradcheck_of_the_linear_maps():
    query = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    key = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    keys_ret = torch.randn(2, 5, 3, dtype=torch.double)
    up = torch.randn(2, 5, 3, dtype=torch.double)
    grads = torch.autograd.grad(
        (returned_keys_straight_through(query, key, keys_ret) * up).sum(), (query, key)
    )
    assert_close(grads[0], up.sum(1))
    assert_close(grads[1], up.sum(1))
    weights = torch.rand(2, 5, dtype=torch.double, requires_grad=True)
    table = torch.randn(4, 3, dtype=torch.double)
    rows = torch.randint(0, 4, (2, 5))
    value = torch.randn(2, 3, dtype=torch.double)
    # Only the weights get a true Jacobian: value's gradient is the estimator's, by design.
    assert torch.autograd.gradcheck(lambda w: mix_values_straight_through(w, rows, table, value), (weights,))
