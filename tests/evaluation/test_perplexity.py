"""Sliding-window perplexity against an independent transcription of the Hugging Face recipe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmt.evaluation.perplexity import perplexity, sliding_window_nll

TEXT = (
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
    "The evil that men do lives after them; the good is oft interred with their bones; so let it be "
    "with Caesar. The noble Brutus hath told you Caesar was ambitious."
)


def reference_nll(model, input_ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The documentation's loop, one window at a time, with the NLL summed token by token."""
    seq_len = input_ids.numel()
    nll, count, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + window, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[None, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(ids).logits
        shift_logits, shift_labels = logits[0, :-1], target_ids[0, 1:]
        nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
        count += int((shift_labels != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll, count


@pytest.fixture
def text_ids(gpt2_tokenizer) -> torch.Tensor:
    ids = torch.tensor(gpt2_tokenizer(TEXT)["input_ids"])  # (L,)
    assert 48 < ids.numel() < 64  # window 32, stride 16: three windows, the last one short
    return ids


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_reference_loop(request, text_ids, model_name, batch_size):
    model = request.getfixturevalue(model_name)
    nll, tokens = sliding_window_nll(model, text_ids, window=32, stride=16, batch_size=batch_size)
    ref_nll, ref_tokens = reference_nll(model, text_ids, window=32, stride=16)
    assert tokens == ref_tokens == text_ids.numel() - 1
    assert nll == pytest.approx(ref_nll, rel=1e-5)


@pytest.mark.parametrize("stride", [7, 16, 32])
def test_batched_equals_unbatched(tiny_gpt2, text_ids, stride):
    single = sliding_window_nll(tiny_gpt2, text_ids, window=32, stride=stride, batch_size=1)
    batched = sliding_window_nll(tiny_gpt2, text_ids, window=32, stride=stride, batch_size=4)
    assert batched[1] == single[1]
    assert batched[0] == pytest.approx(single[0], rel=1e-5)


def test_stride_equal_to_window_scores_disjoint_windows(tiny_gpt2, text_ids):
    nll, tokens = sliding_window_nll(tiny_gpt2, text_ids, window=32, stride=32)
    ref_nll, ref_tokens = reference_nll(tiny_gpt2, text_ids, 32, 32)
    # Two disjoint windows: the first token of each has no context and is not scored.
    assert tokens == ref_tokens == text_ids.numel() - 2
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_text_shorter_than_window(tiny_llama, text_ids):
    short = text_ids[:10]
    nll, tokens = sliding_window_nll(tiny_llama, short, window=32, stride=16, batch_size=4)
    assert tokens == 9
    assert nll == pytest.approx(reference_nll(tiny_llama, short, 32, 16)[0], rel=1e-5)


def test_restores_training_mode(tiny_gpt2, text_ids):
    tiny_gpt2.train()
    sliding_window_nll(tiny_gpt2, text_ids, window=32, stride=16)
    assert tiny_gpt2.training


def test_perplexity_sums_documents_separately(tiny_gpt2, gpt2_tokenizer):
    texts = [TEXT, "To be, or not to be, that is the question."]
    result = perplexity(tiny_gpt2, gpt2_tokenizer, texts, window=32, stride=16, batch_size=2)
    parts = [
        sliding_window_nll(tiny_gpt2, torch.tensor(gpt2_tokenizer(text)["input_ids"]), 32, 16)
        for text in texts
    ]
    assert result["tokens"] == sum(tokens for _, tokens in parts)
    assert result["nll"] == pytest.approx(sum(nll for nll, _ in parts), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"] / result["tokens"]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1, "stride": 1}, "window"),
        ({"window": 32, "stride": 0}, "stride"),
        ({"window": 32, "stride": 33}, "stride"),
        ({"window": 256, "stride": 16}, "context"),
    ],
)
def test_bad_arguments(tiny_gpt2, text_ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_nll(tiny_gpt2, text_ids, **kwargs)
