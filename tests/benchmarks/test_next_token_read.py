"""The next-token study: a document's own entries are readable only from later windows, and the three-way
mixture of the model, the pack and the document's entries."""

import math

import pytest
import torch

from benchmarks.memorize.knn_lm import mixture_nll
from benchmarks.memorize.next_token_read import nll, self_neighbours


def test_a_documents_own_entries_are_read_only_from_later_windows():
    torch.manual_seed(0)
    scored = {
        "queries": torch.randn(7, 4),
        "targets": torch.tensor([10, 11, 12, 13, 14, 15, 16]),
        "windows": torch.tensor([0, 0, 1, 1, 1, 2, 2]),
    }
    distances, tokens = self_neighbours(scored, k=7)
    for position, window in enumerate(scored["windows"].tolist()):
        readable = {10 + j for j in range(7) if scored["windows"][j] < window}
        found = set(tokens[position].tolist()) - {-1}
        assert found == readable
        assert (distances[position, : len(readable)] <= 2.0).all()  # cosine distances of real entries


def test_the_mixture_weighs_model_pack_and_document():
    settings = {"k": 2, "temperature": 1.0, "lam": 0.2, "self_k": 1, "self_temperature": 1.0, "lam_self": 0.1}
    doc = {
        "targets": torch.tensor([5]),
        "teacher": torch.log(torch.tensor([0.5], dtype=torch.float64)),
        "distances": torch.tensor([[0.0, 0.0]]),  # two neighbours at equal weight, one of them the target
        "tokens": torch.tensor([[5, 6]]),
        "self_distances": torch.tensor([[0.0]]),
        "self_tokens": torch.tensor([[5]]),
        "p": {},
    }
    assert nll([doc], "teacher", settings) == pytest.approx(-math.log(0.7 * 0.5 + 0.2 * 0.5 + 0.1 * 1.0))
    # Without memories it is the model's own NLL.
    assert mixture_nll(doc["teacher"], []).item() == pytest.approx(-math.log(0.5))
