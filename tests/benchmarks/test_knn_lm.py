"""The kNN-LM baseline: its interpolation, and scoring the same tokens as ``dmt-eval``."""

import math

import pytest
import torch

from benchmarks.memorize.knn_lm import hidden_and_logprobs, knn_nll
from dmt.evaluation.perplexity import sliding_window_nll


def test_lambda_zero_is_the_teacher():
    lm = torch.log(torch.tensor([0.5, 0.25]))
    distances, neighbours = torch.zeros(2, 3), torch.tensor([[1, 1, 1], [2, 2, 2]])
    assert knn_nll(distances, neighbours, torch.tensor([1, 0]), lm, 3, 1.0, 0.0).item() == pytest.approx(
        -lm.sum().item()
    )


def test_knn_probability_sums_the_weights_of_the_target_token():
    # Three neighbours at squared distances 0, 0, ln 2 (temperature 1): weights 0.4, 0.4, 0.2.
    distances = torch.tensor([[0.0, 0.0, math.log(2.0)]])
    neighbours = torch.tensor([[7, 3, 7]])
    lm = torch.log(torch.tensor([0.1]))
    nll = knn_nll(distances, neighbours, torch.tensor([7]), lm, 3, 1.0, 0.5).item()
    assert nll == pytest.approx(-math.log(0.5 * 0.6 + 0.5 * 0.1))
    # Only the nearest k count: with k = 1 the one neighbour is the target.
    assert knn_nll(distances, neighbours, torch.tensor([7]), lm, 1, 1.0, 0.5).item() == pytest.approx(
        -math.log(0.5 * 1.0 + 0.5 * 0.1)
    )


def test_the_teacher_scores_what_dmt_eval_scores(tiny_gpt2):
    input_ids = torch.randint(0, tiny_gpt2.config.vocab_size, (23,))
    hidden, logprobs, targets = hidden_and_logprobs(tiny_gpt2, input_ids, window=8, stride=5, batch_size=2)
    nll, scored = sliding_window_nll(tiny_gpt2, input_ids, window=8, stride=5, batch_size=2)
    assert len(targets) == scored == 22
    torch.testing.assert_close(targets, input_ids[1:])  # every token after the first, once, in order
    assert -logprobs.sum().item() == pytest.approx(nll, rel=1e-5)
    assert hidden.shape == (22, tiny_gpt2.config.n_embd)
