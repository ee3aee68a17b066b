"""A cache student reading a memory pack with next tokens mixed into its output (``next_token_weight``), as
``dmt-eval`` and ``dmt-long-document`` read: the settings chosen on a validation document, then the
held-out documents, other domains with and without the pack, and long documents read inserting as they go.

python -m benchmarks.memorize.next_token_eval STUDENT --pack PACK --validation NAME --held-out NAME ...
    [--weights 0.1 0.2] [--ks 1024] [--temperatures 0.01] [--max-distances none 0.1]
    [--elsewhere NAME ... --max-harm 1.01] [--long NAME ... --long-weights 0.05 0.1 --long-ks 256]

Documents are the first ``--chars`` characters of NAME (``source/unit`` of a ``dmt.data`` source), windows
of 512 tokens and stride 256. Every setting is a reading setting, given to the loaded student with
:func:`dmt.packs.reading.read_with` (what ``memory_read`` does); the teacher is the student with its output
projection at zero and no mixing (a ``keep_mlp`` cache then adds nothing). ``--elsewhere``: documents of
training sources (never held-out ones) read under each setting with the pack and by the student without
it; the settings chosen are the best on the validation document among those within ``--max-harm`` of the
student without the pack there. ``--long``: the first ``--long-tokens`` tokens of each document read by the
student without a pack, inserting as it reads (``dmt-long-document``), with the long settings chosen on the
validation document read the same way; per quarter against the teacher (without ``--pack``, only this).
Writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from benchmarks.memorize.read_settings import document_text, optional_float
from dmt.evaluation.long_document import inserting_memory, quarter_perplexities
from dmt.evaluation.perplexity import perplexity
from dmt.files import write_json
from dmt.model.persistence import load_student
from dmt.model.surgery import memory_layers
from dmt.packs.reading import read_with

OFF = {"next_token_weight": 0.0}


def silenced(model: PreTrainedModel) -> torch.Tensor:
    """Zero the memory layer's output projection (the student reads as its teacher); returns the weight."""
    (layer,) = memory_layers(model).values()
    weight = layer.out_proj.weight.detach().clone()
    with torch.no_grad():
        layer.out_proj.weight.zero_()
    return weight


def restored(model: PreTrainedModel, weight: torch.Tensor) -> None:
    (layer,) = memory_layers(model).values()
    with torch.no_grad():
        layer.out_proj.weight.copy_(weight)


def read(model: PreTrainedModel, tokenizer: Any, texts: list[str], settings: dict[str, Any]) -> dict:
    """Perplexity of ``texts`` under the reading ``settings``, with tokens/s."""
    read_with(model, settings)
    started = time.perf_counter()
    result = perplexity(model, tokenizer, texts, 512, 256, 4, "student")
    row = {**settings, **result, "tokens_per_second": result["tokens"] / (time.perf_counter() - started)}
    print(json.dumps(row), flush=True)
    return row


def long_read(model: PreTrainedModel, ids: torch.Tensor, settings: dict[str, Any]) -> dict:
    """Quarter perplexities of ``ids (L,)`` read inserting as it goes, from an emptied store."""
    (layer,) = memory_layers(model).values()
    layer.use_store(layer.empty_store())
    read_with(model, settings)
    with inserting_memory(model):
        result = quarter_perplexities(model, ids, 512, 256)
    print(json.dumps({**settings, "quarters": [q["perplexity"] for q in result["quarters"]]}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("--pack", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--held-out", nargs="*", default=[])
    parser.add_argument("--chars", type=int, default=32000)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1024])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.01])
    parser.add_argument("--max-distances", type=optional_float, nargs="+", default=[None])
    parser.add_argument("--elsewhere", nargs="*", default=[])
    parser.add_argument("--elsewhere-chars", type=int, default=6000)
    parser.add_argument("--max-harm", type=float, default=1.01)
    parser.add_argument("--long", nargs="*", default=[])
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--long-weights", type=float, nargs="+", default=[0.05])
    parser.add_argument("--long-ks", type=int, nargs="+", default=[256])
    parser.add_argument("--long-temperatures", type=float, nargs="+", default=[0.02])
    parser.add_argument("--index", default="exact")
    parser.add_argument("--out", type=Path, default=Path("results/memorize/next_token_eval.json"))
    args = parser.parse_args()
    record: dict[str, Any] = {
        "command": "python -m benchmarks.memorize.next_token_eval " + shlex.join(sys.argv[1:])
    }
    if args.pack is not None:
        record |= read_pack_with_next_tokens(args)
    if args.long:
        record["long"] = read_long_documents(args)
    write_json(args.out, record)


def read_pack_with_next_tokens(args: argparse.Namespace) -> dict[str, Any]:
    """The validation grid, the no-harm check elsewhere and the held-out plays, with ``args.pack``."""
    text = document_text(args.validation, args.chars)
    held_out = [document_text(name, args.chars) for name in args.held_out]
    elsewhere = [document_text(name, args.elsewhere_chars) for name in args.elsewhere]
    student, tokenizer = load_student(args.student, memory=args.pack, memory_index={"backend": args.index})
    record: dict[str, Any] = {"pack": str(args.pack)}

    # Validation grid: each setting on the validation play, and elsewhere with the pack
    grid = [
        {"next_token_weight": w, "next_token_topk": k, "next_token_temperature": t, "max_distance": m}
        for w in args.weights
        for k in args.ks
        for t in args.temperatures
        for m in args.max_distances
    ]
    rows = [read(student, tokenizer, [text], settings) for settings in grid]
    record["validation"] = {"document": args.validation, "rows": rows}
    allowed = rows
    if elsewhere:
        bare, _ = load_student(args.student)  # no pack: the figures the pack must not harm
        base = read(bare, tokenizer, elsewhere, OFF)["perplexity"]
        harm = [read(student, tokenizer, elsewhere, settings)["perplexity"] / base for settings in grid]
        record["elsewhere"] = {"documents": args.elsewhere, "without_pack": base, "ratios": harm}
        allowed = [row for row, ratio in zip(rows, harm, strict=True) if ratio <= args.max_harm] or rows
    chosen = {key: min(allowed, key=lambda r: r["perplexity"])[key] for key in grid[0]}
    record["chosen"] = chosen

    # Held-out plays: teacher, the student as it reads today, and the chosen mix
    if held_out:
        as_saved = {**OFF, "max_distance": None}
        weight = silenced(student)
        teacher = read(student, tokenizer, held_out, as_saved)
        restored(student, weight)
        rows = {"teacher": teacher, "student reading the pack": read(student, tokenizer, held_out, as_saved)}
        rows["student + next tokens"] = read(student, tokenizer, held_out, chosen)
        for row in rows.values():
            row["ratio_to_teacher"] = row["perplexity"] / teacher["perplexity"]
        record["held_out"] = {"documents": args.held_out, "rows": rows}
    return record


def read_long_documents(args: argparse.Namespace) -> dict[str, Any]:
    """Long documents read inserting as they go (own entries only), next-token settings chosen on the
    validation play read the same way."""
    bare, tokenizer = load_student(args.student)
    ids = {
        name: torch.tensor(tokenizer(document_text(name, None))["input_ids"][: args.long_tokens])
        for name in [args.validation, *args.long]
    }
    weight = silenced(bare)
    teacher = {name: quarter_perplexities(bare, i, 512, 256) for name, i in ids.items()}
    restored(bare, weight)
    long_grid = [
        {"next_token_weight": w, "next_token_topk": k, "next_token_temperature": t}
        for w in args.long_weights
        for k in args.long_ks
        for t in args.long_temperatures
    ]

    def last_ratio(result: dict, name: str) -> float:
        return result["quarters"][-1]["perplexity"] / teacher[name]["quarters"][-1]["perplexity"]

    scored = [(last_ratio(long_read(bare, ids[args.validation], s), args.validation), s) for s in long_grid]
    long_chosen = min(scored, key=lambda pair: pair[0])[1]
    documents = {}
    for name in args.long:
        rows = {
            "residual cache": long_read(bare, ids[name], OFF),
            "+ next tokens": long_read(bare, ids[name], long_chosen),
        }
        documents[name] = {
            "tokens": len(ids[name]),
            "teacher_quarters": [q["perplexity"] for q in teacher[name]["quarters"]],
            **{
                label: {
                    "quarters": [q["perplexity"] for q in result["quarters"]],
                    "last_quarter_ratio": last_ratio(result, name),
                }
                for label, result in rows.items()
            },
        }
    return {"validation": scored, "chosen": long_chosen, "documents": documents}


if __name__ == "__main__":
    main()
