"""Evaluate a student against its teacher: perplexity table, ablated teacher, side-by-side generations.

The *ablated teacher* is the teacher with the MLPs that the student replaced (by memory layers or
baselines) removed outright (their output zeroed, the residual stream passes through): the ``removed``
baseline before any training. It brackets the student from below: a student no better than the ablated
teacher has learnt nothing useful in its memory.

Students are loaded by :mod:`dmt.model.persistence`; this module only evaluates them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dmt.evaluation.perplexity import PerplexityResult, perplexity
from dmt.files import write_json
from dmt.layers import RemovedMLP
from dmt.model.families import num_blocks, set_mlp

CACHE_VERSION = 1  # bump when the cached teacher result changes meaning


# -- ablation ------------------------------------------------------------------------------------------


def ablate_mlps(model: PreTrainedModel, indices: Iterable[int]) -> PreTrainedModel:
    """Deep copy of ``model`` whose blocks ``indices`` have their MLP removed (:class:`RemovedMLP`).

    ``model`` itself is left untouched. Raises ``ValueError`` for an index outside ``[0, num_blocks)``.
    """
    indices = sorted(set(indices))
    blocks = num_blocks(model)
    bad = [i for i in indices if not 0 <= i < blocks]
    if bad:
        raise ValueError(f"ablate_layers: blocks {bad} do not exist; the model has {blocks} blocks")
    ablated = copy.deepcopy(model)
    for index in indices:
        set_mlp(ablated, index, RemovedMLP())
    return ablated.eval()


# -- evaluation ----------------------------------------------------------------------------------------


def teacher_cache_key(teacher_id: str, texts: Sequence[str], window: int, stride: int) -> str:
    """Hex digest identifying a teacher perplexity computation."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, teacher_id, window, stride, len(texts)]).encode())
    for text in texts:
        # Length-prefixed so that text boundaries are part of the key.
        encoded = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def _teacher_perplexity(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    window: int,
    stride: int,
    batch_size: int,
    cache_dir: str | os.PathLike | None,
    teacher_id: str | None,
) -> tuple[PerplexityResult, bool]:
    """Teacher perplexity and whether it came from the cache (used only with both cache_dir and id)."""
    if cache_dir is None or teacher_id is None:
        return perplexity(teacher, tokenizer, list(texts), window, stride, batch_size, "teacher"), False
    path = Path(cache_dir) / f"teacher-ppl-{teacher_cache_key(teacher_id, texts, window, stride)[:32]}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())["result"]
            hit: PerplexityResult = {
                "perplexity": float(cached["perplexity"]),
                "nll": float(cached["nll"]),
                "tokens": int(cached["tokens"]),
            }
            return hit, True
        except (OSError, ValueError, KeyError):
            pass  # a corrupt entry is recomputed and overwritten
    result = perplexity(teacher, tokenizer, list(texts), window, stride, batch_size, "teacher")
    record = {"teacher_id": teacher_id, "window": window, "stride": stride, "texts": len(texts)}
    write_json(path, {**record, "result": dict(result)})
    return result, False


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        encoded = tokenizer(prompt, return_tensors="pt").to(device)  # input_ids (1, P)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )  # (1, P + new)
    finally:
        model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    student: PreTrainedModel | None = None,
    ablate_layers: Iterable[int] | None = None,
    window: int,
    stride: int,
    batch_size: int,
    cache_dir: str | os.PathLike | None = None,
    teacher_id: str | None = None,
    generation_prompts: Sequence[str] | None = None,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Perplexity of the teacher, the student and the ablated teacher on ``texts``, plus generations.

    Args:
        teacher, tokenizer: the reference model and the tokenizer every model shares
        texts: documents, each scored on its own with sliding windows (see ``perplexity``)
        student: optional memory student
        ablate_layers: blocks whose MLPs the ablated teacher lacks; none or empty: no ablated row
        window, stride, batch_size: sliding-window settings
        cache_dir, teacher_id: the teacher's perplexity is cached in ``cache_dir`` under a hash of
            ``(teacher_id, texts, window, stride)``; ``teacher_id`` must identify the weights (e.g. the
            resolved teacher config), and without it nothing is cached
        generation_prompts, max_new_tokens: greedy continuations of each prompt by each model
    Returns:
        ``{"rows": [{name, perplexity, ratio_to_teacher, tokens, nll}], "settings": {...},
        "generations": [{"prompt", "teacher", "student"?, "ablated"?}]}``, JSON-ready.
    """
    if student is not None and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size})"
        )
    ablate = sorted(set(ablate_layers or []))
    models: dict[str, PreTrainedModel] = {"teacher": teacher}
    if student is not None:
        models["student"] = student
    if ablate:
        models["ablated"] = ablate_mlps(teacher, ablate)

    teacher_result, cached = _teacher_perplexity(
        teacher, tokenizer, texts, window, stride, batch_size, cache_dir, teacher_id
    )
    results: dict[str, PerplexityResult] = {"teacher": teacher_result}
    for name, model in models.items():
        if name != "teacher":
            results[name] = perplexity(model, tokenizer, list(texts), window, stride, batch_size, name)
    rows = [
        {
            "name": name,
            "perplexity": result["perplexity"],
            "ratio_to_teacher": result["perplexity"] / teacher_result["perplexity"],
            "tokens": result["tokens"],
            "nll": result["nll"],
        }
        for name, result in results.items()
    ]
    generations = [
        {
            "prompt": prompt,
            **{name: greedy_generate(m, tokenizer, prompt, max_new_tokens) for name, m in models.items()},
        }
        for prompt in generation_prompts or []
    ]
    settings = {
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "texts": len(texts),
        "ablate_layers": ablate,
        "max_new_tokens": max_new_tokens,
        "teacher_id": teacher_id,
        "teacher_cached": cached,
    }
    return {"rows": rows, "settings": settings, "generations": generations}


def format_table(result: dict[str, Any]) -> str:
    """The perplexity rows of :func:`evaluate` as a fixed-width text table."""
    lines = [f"{'model':<10} {'perplexity':>12} {'vs teacher':>10} {'tokens':>10}"]
    for row in result["rows"]:
        ppl, ratio = row["perplexity"], row["ratio_to_teacher"]
        lines.append(f"{row['name']:<10} {ppl:>12.3f} {ratio:>10.3f} {row['tokens']:>10,}")
    return "\n".join(lines)


def format_generations(result: dict[str, Any]) -> str:
    """Each prompt followed by every model's continuation, for reading side by side."""
    blocks = []
    for entry in result["generations"]:
        lines = [f"prompt: {entry['prompt']!r}"]
        lines += [f"  {name:<8} {text!r}" for name, text in entry.items() if name != "prompt"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def truncate_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int | None
) -> list[str]:
    """Each text cut after its first ``max_tokens`` tokens (at a token boundary), to bound evaluation time."""
    if max_tokens is None:
        return list(texts)
    cut = []
    for text in texts:
        offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        cut.append(text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]])
    return cut
