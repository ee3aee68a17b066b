"""How a cache student reads a memory pack, over its reading settings: the perplexity of a validation
document under each output gain, temperature, top-k, null distance and largest distance read; the held-out
documents are then read with the student's own settings and with the ones chosen on the validation
documents (never chosen on them).

python -m benchmarks.memorize.read_settings STUDENT PACK --validation NAME [--held-out NAME ...]
    [--gains 4 8] [--nulls none 0.02] [--max-distances none 0.03] [--elsewhere NAME ... --max-harm 1.005]

STUDENT: an export whose memory layer reads residual-stream values (``experiment=associative_cache``);
PACK: a memory pack made for it that does not hold the validation document (``dmt-forget`` it first).
Each document is the first ``--chars`` characters of NAME (``source/unit``, a document of a ``dmt.data``
source), read with windows of 512 tokens and stride 256 as ``dmt-eval`` reads.
``--elsewhere``: documents of other domains (first ``--elsewhere-chars`` each, from training sources, never
held-out ones) read beside the validation document under every setting; the settings chosen are then the
best on the validation document among those whose perplexity elsewhere is at most ``--max-harm`` × the
teacher's there, or if none is the least harmful (the student with its output projection at zero reads as
the teacher).
The settings are changed on the loaded student only (the output projection scaled to ``gain`` × its
identity start; the layer's reading settings); the pack is read as it was made. Each row also gives the
quantiles of the queries' nearest-entry distance. Writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dmt.data.corpus import head, read_source
from dmt.evaluation.perplexity import perplexity
from dmt.files import write_json
from dmt.model.persistence import load_student
from dmt.model.surgery import memory_layers

QUANTILES = (0.1, 0.5, 0.9)


def optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null") else float(value)


def document_text(name: str, chars: int | None) -> str:
    """The first ``chars`` characters of document ``name`` (``source/unit``; None: all of it)."""
    documents = {d.name: d for d in read_source(name.split("/", 1)[0])}
    return head(documents[name].text, chars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--held-out", nargs="*", default=[])
    parser.add_argument("--chars", type=int, default=32000)
    parser.add_argument("--gains", type=float, nargs="+", default=[4.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.02])
    parser.add_argument("--topks", type=int, nargs="+", default=[32])
    parser.add_argument("--nulls", type=optional_float, nargs="+", default=[None])
    parser.add_argument("--max-distances", type=optional_float, nargs="+", default=[None])
    parser.add_argument("--elsewhere", nargs="*", default=[])
    parser.add_argument("--elsewhere-chars", type=int, default=8000)
    parser.add_argument("--max-harm", type=float, default=1.005)
    parser.add_argument("--index", default="faiss")
    parser.add_argument("--out", type=Path, default=Path("results/memorize/read_settings.json"))
    args = parser.parse_args()
    text = document_text(args.validation, args.chars)
    held_out = [document_text(name, args.chars) for name in args.held_out]
    elsewhere = [document_text(name, args.elsewhere_chars) for name in args.elsewhere]
    student, tokenizer = load_student(args.student, memory=args.pack, memory_index={"backend": args.index})
    (layer,) = memory_layers(student).values()
    start_gain = layer.cfg.output_gain
    identity = layer.out_proj.weight.detach().clone() / start_gain  # (C, C)
    own = {
        "gain": start_gain,
        "temperature": layer.cfg.temperature,
        "topk": layer.cfg.topk,
        "null_distance": layer.cfg.null_distance,
        "max_distance": layer.cfg.max_distance,
    }

    # Nearest distances: every query's distance to its nearest entry, per read
    nearest: list[np.ndarray] = []
    search = layer.search

    def recording_search(*a, **kw):
        found = search(*a, **kw)
        nearest.append(found.nearest[np.isfinite(found.nearest)])
        return found

    layer.search = recording_search

    def read(
        texts: list[str],
        gain: float,
        temperature: float,
        topk: int,
        null_distance: float | None,
        max_distance: float | None,
    ) -> dict:
        with torch.no_grad():
            layer.out_proj.weight.copy_(identity * gain)
        layer.cfg = replace(
            layer.cfg,
            temperature=temperature,
            topk=topk,
            null_distance=null_distance,
            max_distance=max_distance,
        )
        nearest.clear()
        started = time.perf_counter()
        result = perplexity(student, tokenizer, texts, 512, 256, 4, "student")
        row = {
            "gain": gain,
            "temperature": temperature,
            "topk": topk,
            "null_distance": null_distance,
            "max_distance": max_distance,
            **result,
        }
        row["tokens_per_second"] = result["tokens"] / (time.perf_counter() - started)
        if nearest:
            row["nearest_distance_quantiles"] = np.quantile(np.concatenate(nearest), QUANTILES).tolist()
        print(json.dumps(row), flush=True)
        return row

    grid = [
        {"gain": g, "temperature": t, "topk": k, "null_distance": n, "max_distance": m}
        for g in args.gains
        for t in args.temperatures
        for k in args.topks
        for n in args.nulls
        for m in args.max_distances
    ]
    teacher = {**own, "gain": 0.0}
    rows = [read([text], **settings) for settings in grid]
    record: dict = {"validation": rows}
    allowed = rows
    if elsewhere:
        base = read(elsewhere, **teacher)["perplexity"]
        harm = [read(elsewhere, **settings)["perplexity"] / base for settings in grid]
        record["elsewhere"] = {"documents": args.elsewhere, "teacher": base, "ratios": harm}
        allowed = [row for row, ratio in zip(rows, harm, strict=True) if ratio <= args.max_harm]
        allowed = allowed or [rows[int(np.argmin(harm))]]  # none harmless enough: the least harmful
    best = min(allowed, key=lambda r: r["perplexity"])
    chosen = {key: best[key] for key in own}
    record["chosen"] = chosen
    if held_out:  # none: the validation grid alone
        record["held_out"] = {
            "teacher": read(held_out, **teacher),
            "own settings": read(held_out, **own),
            "chosen settings": read(held_out, **chosen),
        }
    command = "python -m benchmarks.memorize.read_settings " + shlex.join(sys.argv[1:])
    write_json(args.out, {"command": command, **record})


if __name__ == "__main__":
    main()
