"""Sliding-window perplexity of a causal LM, after Hugging Face's "Perplexity of fixed-length models".

A text longer than the model's context is scored with windows of ``window`` tokens whose starts advance
by ``stride``. Each window scores only the tokens the previous window did not, so with ``stride < window``
every token after the first is scored exactly once, with at least ``window - stride`` tokens of context
once the first window is past. ``stride == window`` gives disjoint windows (fast, pessimistic), in which
the first token of each window has no context and is not scored; a small stride approaches the model's
full-context perplexity.

Rather than weighting each window's mean loss by a token count, as the documentation's loop does, the
per-token NLLs are summed (``reduction="sum"``) and the scored tokens counted after the label shift, so
batching windows with padding changes nothing.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dmt.errors import ConfigError
from dmt.progress import progress_bar

IGNORE_INDEX = -100


class PerplexityResult(TypedDict):
    perplexity: float
    nll: float  # summed over all scored tokens, in nats
    tokens: int


def windows(seq_len: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window, in absolute token positions."""
    spans = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        # Position 0 has no context, so the first window scores from position 1.
        spans.append((begin, end, max(prev_end, 1)))
        prev_end = end
        if end == seq_len:
            break
    return spans


def window_batch(
    input_ids: torch.Tensor, spans: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows ``spans`` (of :func:`windows`) of ``input_ids (L,)`` as one right-padded batch: ids and
    attention mask, ``(B, T)`` each on ``input_ids``' device, ``T`` the longest window."""
    width = max(end - begin for begin, end, _ in spans)
    ids = torch.zeros(len(spans), width, dtype=torch.long, device=input_ids.device)  # (B, T)
    mask = torch.zeros_like(ids)  # (B, T)
    for row, (begin, end, _) in enumerate(spans):
        ids[row, : end - begin] = input_ids[begin:end]
        mask[row, : end - begin] = 1
    return ids, mask


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def check_windows(window: int, stride: int, batch_size: int) -> None:
    """Refuse sliding-window settings that cannot score a text, naming the setting."""
    if window < 2:
        raise ConfigError(f"window: must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride: must lie in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")


@torch.no_grad()
def sliding_window_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int = 1,
    token_nll: torch.Tensor | None = None,
    progress: tqdm | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL of one text under sliding windows.

    Args:
        model: Hugging Face causal LM (returns ``.logits`` of shape ``(B, T, V)``)
        input_ids: ``(L,)`` token ids of the whole text
        window: tokens of context per forward pass
        stride: step between window starts, ``1 <= stride <= window``
        batch_size: windows per forward pass; the last batch's short window is right-padded
        token_nll: optional ``(L,)`` float tensor that receives the NLL of each scored token at its position
            (positions not scored are left as they are)
        progress: optional bar advanced by the tokens each batch scores (:func:`scored_tokens` in all)
    Returns:
        ``(nll_sum, n_scored)``: the NLL in nats summed over the scored tokens; ``n_scored = L - 1`` when
        ``stride < window``, one fewer per extra window when ``stride == window``, 0 when ``L < 2``.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (one whole text), got shape {tuple(input_ids.shape)}")
    check_windows(window, stride, batch_size)
    max_positions = _max_positions(model)
    if max_positions is not None and window > max_positions:
        raise ConfigError(f"window: {window} exceeds the model's context of {max_positions} positions")
    seq_len = input_ids.numel()
    if seq_len < 2:
        return 0.0, 0

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    spans = windows(seq_len, window, stride)
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    try:
        for start in range(0, len(spans), batch_size):
            chunk = spans[start : start + batch_size]
            ids, mask = window_batch(input_ids, chunk)  # (B, T) each
            width = ids.shape[1]
            labels = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
            for row, (begin, end, first) in enumerate(chunk):
                labels[row, first - begin : end - begin] = input_ids[first:end]
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            # Logits at t predict token t + 1; float32 so half-precision models sum NLL accurately.
            predicted, targets = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
            nll += F.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            if token_nll is not None:
                per_token = F.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, reduction="none")
                per_token = per_token.view(len(chunk), width - 1)  # (B, T - 1): row j scores token j + 1
                for row, (begin, end, first) in enumerate(chunk):
                    token_nll[first:end] = per_token[row, first - begin - 1 : end - begin - 1].to(token_nll)
            batch_scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
            scored += batch_scored
            if progress is not None:
                progress.update(batch_scored)
    finally:
        model.train(was_training)
    return nll, scored


def scored_tokens(seq_len: int, window: int, stride: int) -> int:
    """How many tokens :func:`sliding_window_nll` scores in a text of ``seq_len`` tokens."""
    return sum(end - first for _, end, first in windows(seq_len, window, stride)) if seq_len >= 2 else 0


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    window: int,
    stride: int,
    batch_size: int = 1,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Corpus perplexity ``exp(total NLL / total scored tokens)`` over separately scored texts.

    Each text is tokenised on its own (with the tokenizer's default special tokens, e.g. a BOS), so no
    window sees context from another document. A progress bar named ``desc`` counts the scored tokens.
    """
    encoded = [torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long) for text in texts]  # (L,) each
    nll, tokens = 0.0, 0
    total = sum(scored_tokens(ids.numel(), window, stride) for ids in encoded)
    with progress_bar(total, desc) as bar:
        for ids in encoded:
            text_nll, text_tokens = sliding_window_nll(model, ids, window, stride, batch_size, progress=bar)
            nll += text_nll
            tokens += text_tokens
    if tokens == 0:
        raise ValueError("no token to score: every text is shorter than 2 tokens")
    return {"perplexity": math.exp(nll / tokens), "nll": nll, "tokens": tokens}
