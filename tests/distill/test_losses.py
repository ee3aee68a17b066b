import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence
from torch.testing import assert_close

from dmt.distill.losses import (
    ce_loss,
    distillation_divergence,
    hidden_mse,
    jsd_loss,
    kd_loss,
    reverse_kd_loss,
)


def test_kd_is_zero_for_identical_logits_and_matches_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.ones(2, 3)
    assert kd_loss(t, t, mask, 2.0).abs() < 1e-6
    expected = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(
        -1
    ).mean() * 4
    assert_close(kd_loss(s, t, mask, 2.0), expected)


def test_padding_is_masked():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0]])
    s_garbage = s.clone()
    s_garbage[0, 3] = 100.0
    assert_close(kd_loss(s, t, mask, 1.0), kd_loss(s_garbage, t, mask, 1.0))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert_close(ce_loss(s, ids, mask), F.cross_entropy(s[0, :2], ids[0, 1:3]))
    assert_close(hidden_mse(s, s_garbage, mask), torch.tensor(0.0))
    assert_close(hidden_mse(torch.zeros_like(t), t, mask), torch.tensor(1.0))
    assert_close(hidden_mse(100 * s, 100 * t, mask), hidden_mse(s, t, mask))


def _logits(seed: int = 0, shape: tuple[int, ...] = (2, 3, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (student, teacher) pair of logits ``(B, T, V)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


# (name, jsd_beta): every divergence, and the generalised JSD away from and at its endpoints.
DIVERGENCE_SETTINGS = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


@pytest.mark.parametrize("name,beta", DIVERGENCE_SETTINGS)
def test_divergence_is_zero_only_when_student_matches_teacher(name, beta):
    s, t = _logits()
    mask = torch.ones(2, 3)
    assert distillation_divergence(name, t, t, mask, 2.0, beta).abs() < 1e-6
    # A constant shift leaves the softmax unchanged.
    assert distillation_divergence(name, t + 3.0, t, mask, 2.0, beta).abs() < 1e-6
    assert distillation_divergence(name, s, t, mask, 2.0, beta) > 1e-3


def _categorical(logits: torch.Tensor, temperature: float) -> Categorical:
    return Categorical(logits=logits.double() / temperature)


def test_kl_directions_match_torch_distributions():
    s, t = _logits()
    mask, temperature = torch.ones(2, 3), 2.0
    student, teacher = _categorical(s, temperature), _categorical(t, temperature)
    forward = kl_divergence(teacher, student).mean() * temperature**2
    reverse = kl_divergence(student, teacher).mean() * temperature**2
    assert_close(kd_loss(s, t, mask, temperature), forward.float())
    assert_close(reverse_kd_loss(s, t, mask, temperature), reverse.float())
    assert not torch.isclose(forward, reverse)  # the two directions really differ on this example


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_an_explicit_sum(beta):
    s, t = _logits()
    mask, temperature = torch.ones(2, 3), 1.5
    p_s = F.softmax(s.double() / temperature, -1)
    p_t = F.softmax(t.double() / temperature, -1)
    m = beta * p_t + (1 - beta) * p_s
    expected = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    assert_close(jsd_loss(s, t, mask, temperature, beta), (expected.mean() * temperature**2).float())


def test_jsd_endpoints_are_the_kl_limits_as_in_trl():
    s, t = _logits()
    mask = torch.ones(2, 3)
    forward, reverse = kd_loss(s, t, mask, 2.0), reverse_kd_loss(s, t, mask, 2.0)
    assert_close(jsd_loss(s, t, mask, 2.0, 0.0), forward)
    assert_close(jsd_loss(s, t, mask, 2.0, 1.0), reverse)
    # JSD_β itself vanishes at the ends; the endpoints are the limits of JSD_β / β and JSD_β / (1 − β).
    eps = 1e-3
    assert_close(jsd_loss(s, t, mask, 2.0, eps) / eps, forward, rtol=2e-2, atol=0)
    assert_close(jsd_loss(s, t, mask, 2.0, 1 - eps) / eps, reverse, rtol=2e-2, atol=0)


def test_jsd_is_symmetric_and_bounded_at_half():
    s, t = _logits()
    mask, temperature = torch.ones(2, 3), 2.0
    assert_close(jsd_loss(s, t, mask, temperature, 0.5), jsd_loss(t, s, mask, temperature, 0.5))
    far = jsd_loss(100 * s, 100 * t, mask, temperature, 0.5)  # nearly disjoint distributions
    assert far <= math.log(2) * temperature**2 + 1e-5


@pytest.mark.parametrize("name,beta", DIVERGENCE_SETTINGS)
def test_divergence_ignores_masked_positions(name, beta):
    s, t = _logits(shape=(1, 4, 5))
    mask = torch.tensor([[1, 1, 1, 0]])
    s_garbage = s.clone()
    s_garbage[0, 3] = 100.0
    loss = distillation_divergence(name, s, t, mask, 1.0, beta)
    assert_close(distillation_divergence(name, s_garbage, t, mask, 1.0, beta), loss)
    # The mean runs over the real positions only.
    assert_close(distillation_divergence(name, s[:, :3], t[:, :3], torch.ones(1, 3), 1.0, beta), loss)


@pytest.mark.parametrize("name,beta", DIVERGENCE_SETTINGS)
@pytest.mark.parametrize("student_scale", [1.0, 1e4])
def test_divergence_gradients_are_finite_on_extreme_logits(name, beta, student_scale):
    s, t = _logits()
    s = (student_scale * s).requires_grad_()
    # At scale 1e4 the softened probabilities underflow to exact zeros.
    loss = distillation_divergence(name, s, 1e4 * t, torch.ones(2, 3), 1.0, beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if student_scale == 1.0:  # a saturated student softmax has, rightly, no gradient
        assert s.grad.abs().sum() > 0


def test_bad_divergence_or_beta_names_the_argument():
    s, t = _logits()
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"distill\.divergence: expected one of forward_kl, reverse_kl, jsd"):
        distillation_divergence("kl", s, t, mask, 1.0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1\.5"):
        jsd_loss(s, t, mask, 1.0, 1.5)
