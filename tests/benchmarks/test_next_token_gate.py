"""The gate study scores each gate offline from recorded neighbours exactly as the built read mixes them."""

import math

import numpy as np
import pytest
import torch

from benchmarks.memorize.next_token_gate import gate, memory_reads, perplexity_of
from dmt.layers.next_tokens import mix_next_tokens, neighbour_distribution


@pytest.mark.parametrize(("kind", "scale"), [("fixed", None), ("exp", 0.3)])
def test_the_offline_perplexity_is_the_built_mixtures(kind, scale):
    generator = torch.Generator().manual_seed(0)
    length, heads, k, vocab = 9, 2, 5, 7
    logits = torch.randn(1, length, vocab, generator=generator)
    target = torch.randint(0, vocab, (length,), generator=generator)
    distances = torch.rand(length, heads, k, generator=generator).sort(dim=2).values
    tokens = torch.randint(-1, vocab, (length, heads, k), generator=generator)  # -1: unknown
    tokens[0] = -1  # a position whose neighbours' next tokens are all unknown: it mixes nothing

    read = neighbour_distribution(distances.reshape(-1, k), tokens.reshape(-1, k), 0.2, 0.3, heads, scale)
    mixed = mix_next_tokens(logits, [read])[0]  # (T, V)
    built = math.exp(-mixed.gather(1, target[:, None]).mean().item())

    record = {"target": target.numpy(), "distances": distances.numpy(), "tokens": tokens.numpy()}
    log_p = torch.log_softmax(logits[0], -1).gather(1, target[:, None])[:, 0].numpy()
    nearest, p_memory = memory_reads(record, temperature=0.2, k=k)
    offline = perplexity_of([(log_p, nearest, p_memory)], lambda d: gate(kind, 0.3, scale, d))
    assert offline == pytest.approx(built, rel=1e-5)
    assert np.isinf(nearest[0]).all()
