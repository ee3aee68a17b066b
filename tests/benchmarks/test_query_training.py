import numpy as np
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from benchmarks.memorize.query_training import mixed_nll, others_first
from dmt.layers.next_tokens import mix_next_tokens, neighbour_distribution

GATE = {"weight": 0.7, "scale": 0.02, "temperature": 0.05, "k": 6}


def test_the_training_loss_is_the_built_mixtures_nll():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(10, 8, generator=generator)
    keys = F.normalize(torch.randn(10, 6, 8, generator=generator), dim=2)
    tokens = torch.randint(0, 20, (10, 6), generator=generator)
    tokens[0, :3] = -1  # next tokens unknown
    logits = torch.randn(1, 10, 20, generator=generator)
    target = torch.randint(0, 20, (10,), generator=generator)
    target[1] = tokens[1, 0]  # a target the memory names
    distances = 1.0 - torch.einsum("nd,nkd->nk", F.normalize(queries, dim=1), keys)
    read = neighbour_distribution(distances, tokens, GATE["temperature"], GATE["weight"], 1, GATE["scale"])
    built = -mix_next_tokens(logits, [read])[0].gather(1, target[:, None])[:, 0]
    log_p = torch.log_softmax(logits[0], -1).gather(1, target[:, None])[:, 0]
    valid = torch.ones(10, 6, dtype=torch.bool)
    assert_close(mixed_nll(queries, keys, tokens, valid, log_p, target, GATE), built)


def test_a_querys_own_document_is_left_out_and_the_order_kept():
    found = np.array([[4, 0, 5, 1, 2], [3, 4, 0, 1, 2]])
    documents = np.array([0, 0, 1, 1, 2, 2])  # entry -> document
    ids, valid = others_first(found, documents, own=np.array([2, 0]), k=3)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [3, 4, 2]])
    np.testing.assert_array_equal(valid, [[True, True, True], [True, True, True]])
    ids, valid = others_first(found, documents, own=np.array([1, 1]), k=4)  # row 1: three of others
    np.testing.assert_array_equal(ids, [[4, 0, 5, 1], [4, 0, 1, 3]])
    np.testing.assert_array_equal(valid, [[True, True, True, True], [True, True, True, False]])
