import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dmt.distill.losses import ce_loss, hidden_mse, kd_loss


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
