"""Next tokens as a distribution: the mixture's arithmetic, the next tokens a layer records as it inserts,
and a student whose logits become the mixture of its model and its memory's next tokens in evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_teacher_cfg

from dmt.errors import ConfigError
from dmt.layers.next_tokens import NextTokenRead, mix_next_tokens, neighbour_distribution
from dmt.model.loading import load_teacher
from dmt.model.surgery import build_student, memory_layers, memory_protocol, resolve_layer_configs
from dmt.packs.reading import read_with

PLAN = {"blocks": [3], "type": "associative", "heads": 2, "key_dim": 8, "topk": 4, "capacity": 256}
PLAN |= {"metric": "cosine", "novelty_threshold": 0.0, "temperature": 0.1}


def dense_mixture(logits: torch.Tensor, read: NextTokenRead) -> torch.Tensor:
    """The mixture built the plain way: ``p_memory`` as a dense ``(N, V)`` table per head."""
    batch, length, vocab = logits.shape
    weights = read.weights.reshape(batch * length, read.heads, -1)
    tokens = read.tokens.reshape(batch * length, read.heads, -1)
    lam = read.lam.reshape(batch * length, read.heads)
    memory = torch.zeros(batch * length, read.heads, vocab).scatter_add_(2, tokens, weights)
    mixed = (1 - lam.mean(1))[:, None] * F.softmax(logits.reshape(-1, vocab), -1)
    mixed = mixed + (lam[..., None] * memory).mean(1)
    return mixed.log().reshape(batch, length, vocab)


def random_read(batch: int, length: int, heads: int, k: int, vocab: int, seed: int = 0) -> NextTokenRead:
    generator = torch.Generator().manual_seed(seed)
    distances = torch.rand(batch * length * heads, k, generator=generator)
    tokens = torch.randint(-1, 6, (batch * length * heads, k), generator=generator)  # repeats, unknowns
    distances[0] = float("inf")  # a query without neighbours
    tokens[1] = -1  # one whose neighbours' next tokens are all unknown
    return neighbour_distribution(distances, tokens, temperature=0.1, weight=0.3, heads=heads)


def test_the_mixture_is_the_dense_one_and_a_distribution():
    logits = torch.randn(2, 5, 11)
    read = random_read(2, 5, heads=2, k=4, vocab=11)
    mixed = mix_next_tokens(logits, [read])
    torch.testing.assert_close(mixed, dense_mixture(logits, read))
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(2, 5))
    assert read.lam[0] == 0 and read.lam[1] == 0 and read.lam[2] == pytest.approx(0.3)
    assert torch.all(read.weights[1] == 0)


def test_lambda_falls_with_the_distance_of_the_nearest_known_next_token():
    distances = torch.tensor([[0.01, 0.2], [0.3, 0.4], [0.05, 0.5], [float("inf"), float("inf")]])
    tokens = torch.tensor([[3, 4], [5, 6], [-1, 7], [1, 2]])  # row 2: its nearest's next token unknown
    fixed = neighbour_distribution(distances, tokens, 0.1, 0.3, heads=1)
    gated = neighbour_distribution(distances, tokens, 0.1, 0.3, heads=1, distance_scale=0.05)
    torch.testing.assert_close(fixed.lam, torch.tensor([0.3, 0.3, 0.3, 0.0]))
    expected = 0.3 * torch.exp(-torch.tensor([0.01, 0.3, 0.5]) / 0.05)  # the nearest known: 0.01, 0.3, 0.5
    torch.testing.assert_close(gated.lam, torch.cat([expected, torch.zeros(1)]))
    torch.testing.assert_close(gated.weights, fixed.weights)  # the gate weighs the mix, not its neighbours
    rounded = neighbour_distribution(torch.tensor([[-1e-6]]), torch.tensor([[3]]), 0.1, 0.9, 1, 1e-4)
    assert rounded.lam.item() == pytest.approx(0.9)  # a distance rounded below 0 never lifts λ above weight


def test_a_read_of_more_positions_mixes_into_the_last_ones():
    """Generation computes the logits of the last position only; the read covers the whole prompt."""
    logits = torch.randn(2, 5, 11)
    read = random_read(2, 5, heads=2, k=4, vocab=11)
    torch.testing.assert_close(
        mix_next_tokens(logits[:, -1:], [read]), mix_next_tokens(logits, [read])[:, -1:]
    )
    with pytest.raises(RuntimeError, match="belongs to another forward"):
        mix_next_tokens(torch.randn(2, 6, 11), [read])


def student(plan: dict | None = None):
    torch.manual_seed(0)
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    return build_student(teacher, resolve_layer_configs({**PLAN, **(plan or {})}, teacher.config)).eval()


def test_inserted_entries_record_the_token_that_followed():
    model = student()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with memory_protocol(model).each_forward(model, insert=True), torch.no_grad():
        model(ids)
    store = memory_layers(model)[3].store
    following = torch.cat([ids[:, 1:], torch.full((2, 1), -1)], 1)  # a row's last token: none known
    expected = np.sort(following.repeat_interleave(2).numpy())  # every token novel, per head
    assert np.array_equal(np.sort(store.next_tokens(store.live_ids())), expected)


def filled_student(seed: int) -> tuple:
    """A student whose cache has read 64 random tokens, a query of 2 x 10 others, and the list of the
    next-token reads its layer hands over from then on."""
    model = student()
    generator = torch.Generator().manual_seed(seed)
    with memory_protocol(model).each_forward(model, insert=True), torch.no_grad():
        model(torch.randint(0, 500, (4, 16), generator=generator))
    layer = memory_layers(model)[3]
    taken: list[NextTokenRead] = []
    take = layer.take_next_token_read

    def keep() -> NextTokenRead | None:
        read = take()
        if read is not None:
            taken.append(read)
        return read

    layer.take_next_token_read = keep
    return model, layer, torch.randint(0, 500, (2, 10), generator=generator), taken


def test_an_evaluation_forward_mixes_the_next_tokens_of_the_nearest_entries():
    model, layer, query, taken = filled_student(seed=2)
    with torch.no_grad():
        plain = model(query).logits
    read_with(model, {"next_token_weight": 0.4, "next_token_topk": 16, "next_token_temperature": 0.05})
    with torch.no_grad():
        out = model(query, labels=query)
    (read,) = taken
    assert read.weights.shape == (2 * 10 * 2, 16) and bool(read.lam.gt(0).all())
    torch.testing.assert_close(out.logits, mix_next_tokens(plain, [read]))  # the residual read is unchanged
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(2, 10))
    expected_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), query[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected_loss)
    assert layer.take_next_token_read() is None  # taken once
    model.train()
    with torch.no_grad():
        trained = model(query).logits
    assert layer.take_next_token_read() is None and not torch.allclose(
        trained.exp().sum(-1), torch.ones(2, 10)
    )


def test_the_mix_reads_beyond_the_residual_reads_radius_under_its_own_gate():
    model, _, query, taken = filled_student(seed=3)
    read_with(model, {"max_distance": 1e-6})  # the residual read finds nothing this near
    with torch.no_grad():
        bounded = model(query).logits
    read_with(model, {"next_token_weight": 0.4, "next_token_topk": 16, "next_token_distance_scale": 0.5})
    with torch.no_grad():
        out = model(query).logits
    (read,) = taken
    assert bool(read.lam.gt(0).all()) and bool(read.lam.lt(0.4).all())  # gated, not cut by max_distance
    torch.testing.assert_close(out, mix_next_tokens(bounded, [read]))


def test_next_token_settings_are_checked_and_named():
    with pytest.raises(ConfigError, match=r"swap\.read\.next_token_weight: must lie in \[0, 1\), got 1\.0"):
        student({"next_token_weight": 1.0})
    with pytest.raises(ConfigError, match=r"swap\.read\.next_token_topk: must be >= 1"):
        student({"next_token_topk": 0})
    with pytest.raises(ConfigError, match=r"swap\.read\.next_token_distance_scale: must be > 0 or null"):
        student({"next_token_distance_scale": 0.0})
    featural = student({"type": "featural", "novelty_threshold": None})
    with pytest.raises(
        ConfigError, match=r"memory_read\.next_token_weight: no memory layer .*\(featural at block 3\)"
    ):
        read_with(featural, {"next_token_weight": 0.2})


def test_a_mixed_student_gives_each_layer_the_reading_settings_it_has():
    # A featural layer below the cache (as in a smaller student with a pack): the cache's settings
    # reach the cache, the shared ones both layers, and neither layer is refused.
    model = student({"blocks": [2, 3], "type": ["featural", "associative"], "novelty_threshold": None})
    read_with(model, {"next_token_weight": 0.4, "next_token_topk": 16, "topk": 3})
    featural, cache = memory_layers(model)[2], memory_layers(model)[3]
    assert (cache.cfg.next_token_weight, cache.cfg.next_token_topk, cache.cfg.topk) == (0.4, 16, 3)
    assert featural.cfg.topk == 3 and not hasattr(featural.cfg, "next_token_weight")
