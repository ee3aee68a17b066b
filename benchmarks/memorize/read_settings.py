"""How a cache student reads a memory pack, over its reading settings: the perplexity of a validation
document under each output gain, temperature and top-k; the held-out documents are then read with the
student's own settings and with the ones chosen on the validation document (never chosen on them).

python -m benchmarks.memorize.read_settings STUDENT PACK --validation NAME --held-out NAME ... [--gains 4 8]

STUDENT: an export whose memory layer reads residual-stream values (``experiment=associative_cache``);
PACK: a memory pack made for it that does not hold the validation document (``dmt-forget`` it first).
Each document is the first ``--chars`` characters of NAME, a document of the Shakespeare source, read with
windows of 512 tokens and stride 256 as ``dmt-eval`` reads.
The settings are changed on the loaded student only (the output projection scaled to ``gain`` × its
identity start, the layer's temperature and top-k); the pack is read as it was made. Writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dmt.data.corpus import head, read_source
from dmt.evaluation.perplexity import perplexity
from dmt.files import write_json
from dmt.model.persistence import load_student
from dmt.model.surgery import memory_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--held-out", nargs="+", required=True)
    parser.add_argument("--chars", type=int, default=32000)
    parser.add_argument("--gains", type=float, nargs="+", default=[4.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.02])
    parser.add_argument("--topks", type=int, nargs="+", default=[32])
    parser.add_argument("--index", default="faiss")
    parser.add_argument("--out", type=Path, default=Path("results/memorize/read_settings.json"))
    args = parser.parse_args()
    documents = {d.name: d for d in read_source("shakespeare")}
    text = head(documents[args.validation].text, args.chars)
    held_out = [head(documents[name].text, args.chars) for name in args.held_out]
    student, tokenizer = load_student(args.student, memory=args.pack, memory_index={"backend": args.index})
    (layer,) = memory_layers(student).values()
    start_gain = layer.cfg.output_gain
    identity = layer.out_proj.weight.detach().clone() / start_gain  # (C, C)
    own = {"gain": start_gain, "temperature": layer.cfg.temperature, "topk": layer.cfg.topk}

    def read(texts: list[str], gain: float, temperature: float, topk: int) -> dict:
        with torch.no_grad():
            layer.out_proj.weight.copy_(identity * gain)
        layer.cfg = replace(layer.cfg, temperature=temperature, topk=topk)
        started = time.perf_counter()
        result = perplexity(student, tokenizer, texts, 512, 256, 4, "student")
        row = {"gain": gain, "temperature": temperature, "topk": topk, **result}
        row["tokens_per_second"] = result["tokens"] / (time.perf_counter() - started)
        print(json.dumps(row), flush=True)
        return row

    rows = [
        read([text], gain, temperature, topk)
        for gain in args.gains
        for temperature in args.temperatures
        for topk in args.topks
    ]
    best = min(rows, key=lambda r: r["perplexity"])
    chosen = {key: best[key] for key in own}
    held = {"own settings": read(held_out, **own), "chosen settings": read(held_out, **chosen)}
    command = "python -m benchmarks.memorize.read_settings " + shlex.join(sys.argv[1:])
    write_json(args.out, {"command": command, "validation": rows, "chosen": chosen, "held_out": held})


if __name__ == "__main__":
    main()
