"""Straight-through rules: dQuery = dKeyRet, dKeyInserted = dKeyRet, dValueInserted = dValueRet."""

import torch
from torch.testing import assert_close

from dmt.layers.straight_through import retrieve_straight_through


def test_gradients_follow_the_straight_through_rules():
    torch.manual_seed(0)
    n, k, dk, dv = 3, 4, 5, 6
    query = torch.randn(n, dk, requires_grad=True)
    key = torch.randn(n, dk, requires_grad=True)
    value = torch.randn(n, dv, requires_grad=True)
    keys_ret, values_ret = torch.randn(n, k, dk), torch.randn(n, k, dv)
    out_keys, out_values = retrieve_straight_through(query, key, value, keys_ret, values_ret)
    assert_close(out_keys, keys_ret)
    assert_close(out_values, values_ret)

    grad_keys, grad_values = torch.randn(n, k, dk), torch.randn(n, k, dv)
    (out_keys * grad_keys).sum().backward(retain_graph=True)
    assert_close(query.grad, grad_keys.sum(1))
    assert_close(key.grad, grad_keys.sum(1))
    assert value.grad is None or torch.count_nonzero(value.grad) == 0
    (out_values * grad_values).sum().backward()
    assert_close(value.grad, grad_values.sum(1))


def test_gradcheck_of_the_linear_map():
    # The estimator is linear in the upstream gradient; gradcheck confirms backward matches its own Jacobian
    # for the inputs it routes to (query/key get the keys' Jacobian, value the values').
    query = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    key = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    value = torch.randn(2, 4, dtype=torch.double, requires_grad=True)
    keys_ret = torch.randn(2, 5, 3, dtype=torch.double)
    values_ret = torch.randn(2, 5, 4, dtype=torch.double)
    out_k, out_v = retrieve_straight_through(query, key, value, keys_ret, values_ret)
    up_k, up_v = torch.randn_like(out_k), torch.randn_like(out_v)
    grads = torch.autograd.grad((out_k * up_k).sum() + (out_v * up_v).sum(), (query, key, value))
    assert_close(grads[0], up_k.sum(1))
    assert_close(grads[1], up_k.sum(1))
    assert_close(grads[2], up_v.sum(1))
