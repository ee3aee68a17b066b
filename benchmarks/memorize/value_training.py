"""Training the pack's values for the cache's residual read, beside the gated next-token mix: does what
the cache adds to the residual stream, learned per entry, predict the held-out plays better than the next
tokens alone?

python -m benchmarks.memorize.value_training STUDENT PACK FEATURES --validation NAME --out-pack DIR
    [--every 12] [--lr 0.075] [--batch 256] [--leaves-to-search 48] [--max-distance D]
    [--residual-distance-scale S] [--elsewhere NAME ... [--elsewhere-chars 6000]]
    [--elsewhere-train NAME ... [--elsewhere-train-chars 8000]] [--out FILE]

The student reads a pack two ways (dmt/layers/associative.py): the residual read adds the output
projection of a softmax-weighted sum of its ``topk`` nearest entries' values to the last block's output,
and the gated mix (dmt/layers/next_tokens.py) mixes their next tokens into the output probabilities. A
pack memorised by the cache holds each entry's next-token embedding as its value; here every value is
learned instead, from zero (an entry no training position reads stays inert). The training positions,
their neighbours (the entries of *other* documents: leave one document out) and the validation play are
those of benchmarks/memorize/query_training.py, from the same ``FEATURES`` files; the loss is the NLL of
the read the student builds, :func:`read_nll`. One pass in random order, SparseAdam on the values of the
entries read. ``--max-distance``: the residual read's radius while training (neighbours farther are not
read, so their values are not trained; default none, all ``topk``); read the pack under the same radius.
``--residual-distance-scale``: the read's weights fall with the nearest neighbour's distance, the
layer's ``residual_distance_scale``: train and read the pack under the same scale.
``--elsewhere``: documents of other domains (first ``--elsewhere-chars`` each, from training sources, never
held-out ones) read before and after training beside the validation play, against the student without the
pack (the harm the read does elsewhere). ``--elsewhere-train``: other documents of other domains (first
``--elsewhere-train-chars`` each, every window) whose positions join the training, reading the whole pack:
what the read adds where the pack does not belong is trained too. Features are kept per document name in
``FEATURES``, so a name serves one role only.
Writes the pack with the learned values as ``--out-pack`` (every other array as it was; the student reads
it with ``memory_read={max_distance: D, ...}``, ``null`` for none, which turns its residual read on) and
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.memorize.query_training import (
    VALIDATION_CHARS,
    PackSearch,
    as_torch,
    mixed_nll,
    pack_arrays,
    recorded,
)
from benchmarks.memorize.read_settings import document_text
from dmt.data.corpus import read_source
from dmt.files import check_directory_target, write_json
from dmt.kernel.ops import fall_with_distance, neighbour_weights, null_score, within
from dmt.kernel.pack_files import SHARDS, read_shard
from dmt.layers.associative import AssociativeMemory
from dmt.model.families import final_norm
from dmt.model.persistence import load_student
from dmt.packs.files import is_pack, read_pack, write_manifest, write_shard
from dmt.packs.reading import inserting_layers
from dmt.progress import progress_bar


def read_nll(
    layer: AssociativeMemory,
    norm: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    target: torch.Tensor,
    gate: dict[str, float],
) -> torch.Tensor:
    """``(N,)`` NLL of the targets under the student's read of neighbours whose normalised ``keys (N, K,
    Dk)`` and next ``tokens (N, K)`` are given, nearest first, ``valid (N, K)``, with the values ``(N, k,
    Dv)`` of the first ``k = topk`` (or more):
    the residual read of the first ``topk`` added to the last block's output ``x (N, C)``, the output
    head's probabilities mixed with the neighbours' next tokens under ``gate`` (:func:`mixed_nll`).
    Differentiable in the values."""
    # Residual read: the layer's own weighting of its topk nearest (cosine distances).
    top = layer.cfg.topk
    distances = 1.0 - torch.einsum("nd,nkd->nk", F.normalize(queries, dim=1), keys[:, :top])  # (N, k)
    cfg = layer.cfg
    weights = neighbour_weights(
        layer.scores(distances),
        within(valid[:, :top], distances, cfg.max_distance),
        cfg.weighting,
        None,
        null_score(cfg.null_distance, cfg.metric, cfg.temperature),
    )  # (N, k)
    weights = fall_with_distance(weights, distances, valid[:, :top], cfg.residual_distance_scale)
    residual = layer.out_proj(torch.einsum("nk,nkd->nd", weights, values[:, :top]))  # (N, C)
    # Output head: the student's log-probability of each target with the read added.
    logits = head(norm(x + residual)).float()  # (N, V)
    log_p = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]  # (N,)
    return mixed_nll(queries, keys, tokens, valid, log_p, target, gate)


def write_values(pack: Path, block: str, values: np.ndarray, out: Path) -> None:
    """Copy ``pack`` to ``out`` with the values of layer ``block`` replaced by ``values (M, Dv)`` (every
    entry of the pack, in document order); each shard is read checked and written with its manifest."""
    manifest = read_pack(pack)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for document in manifest.documents:
        count = document.entries.get(block, 0)
        arrays = read_shard(pack / SHARDS / document.shard, block, count, None, None)
        arrays["values"] = values[start : start + count].astype(arrays["values"].dtype)
        start += count
        write_shard(out, document.shard, {block: arrays})
    if start != len(values):
        raise ValueError(f"{len(values)} values for the {start} entries of {pack}")
    write_manifest(out, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("features", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--out-pack", type=Path, required=True)
    parser.add_argument("--every", type=int, default=12)
    parser.add_argument(
        "--gate", type=json.loads, default={"weight": 0.7, "scale": 0.02, "temperature": 0.01, "k": 1024}
    )
    parser.add_argument("--lr", type=float, default=0.075)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--leaves-to-search", type=int, default=48)
    parser.add_argument("--max-distance", type=float, default=None)
    parser.add_argument("--residual-distance-scale", type=float, default=None)
    parser.add_argument("--elsewhere", nargs="*", default=[])
    parser.add_argument("--elsewhere-chars", type=int, default=6000)
    parser.add_argument("--elsewhere-train", nargs="*", default=[])
    parser.add_argument("--elsewhere-train-chars", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=Path("results/memorize/value_training.json"))
    args = parser.parse_args()
    check_directory_target(args.out_pack, is_pack, "memory pack", keep=[args.pack, args.student])
    roles = [args.validation, *args.elsewhere, *args.elsewhere_train]
    if len(set(roles)) != len(roles):
        parser.error(
            f"a document may serve one role only: --validation, --elsewhere, --elsewhere-train {roles}"
        )

    student, tokenizer = load_student(args.student)
    student.requires_grad_(False)
    ((block, layer),) = inserting_layers(student).items()
    layer.cfg = replace(
        layer.cfg, max_distance=args.max_distance, residual_distance_scale=args.residual_distance_scale
    )
    norm, head = final_norm(student), student.get_output_embeddings()
    names, keys, tokens, documents = pack_arrays(args.pack, block)
    texts = {d.name: d.text for d in read_source(names[0].split("/", 1)[0])}
    if set(roles) & set(names):
        parser.error(
            f"the pack holds {sorted(set(roles) & set(names))}: validate and train elsewhere on others"
        )
    train = [recorded(student, tokenizer, args.features, n, texts[n], args.every) for n in names]
    other = [
        recorded(student, tokenizer, args.features, n, document_text(n, args.elsewhere_train_chars), 1)
        for n in args.elsewhere_train
    ]
    validation = {
        "validation": recorded(
            student,
            tokenizer,
            args.features,
            args.validation,
            document_text(args.validation, VALIDATION_CHARS),
            1,
        )
    }
    if args.elsewhere:
        parts = [
            recorded(student, tokenizer, args.features, n, document_text(n, args.elsewhere_chars), 1)
            for n in args.elsewhere
        ]
        validation["elsewhere"] = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    positions = {name: np.concatenate([record[name] for record in train + other]) for name in train[0]}
    # Each position's own document (-1 elsewhere: the pack holds none of it).
    own = np.concatenate(
        [np.full(len(record["target"]), n) for n, record in enumerate(train)]
        + [np.full(len(record["target"]), -1) for record in other]
    )
    search = PackSearch(keys, tokens, documents, args.leaves_to_search)
    values = nn.Embedding(len(keys), layer.value_dim, sparse=True)
    nn.init.zeros_(values.weight)
    k = int(args.gate["k"])

    def nll(record: dict[str, torch.Tensor], own: np.ndarray | None = None) -> torch.Tensor:
        with torch.no_grad():
            queries = layer.query_proj(record["h"].float())  # (N, Dk)
        found, valid = search.neighbours(queries, k, own)  # (N, K)
        return read_nll(
            layer,
            norm,
            head,
            record["x"],
            queries,
            search.keys[found],
            values(found[:, : layer.cfg.topk]),
            search.tokens[found],
            valid,
            record["target"],
            args.gate,
        )

    def validate() -> dict[str, float]:
        """The perplexity of each validation text read with the pack."""
        figures = {}
        with torch.no_grad():
            for role, record in validation.items():
                parts = [
                    nll(as_torch({n: a[i : i + 512] for n, a in record.items()}))
                    for i in range(0, len(record["target"]), 512)
                ]
                figures[role] = math.exp(float(torch.cat(parts).mean()))
        return figures

    bare = {role: math.exp(-float(record["log_p"].mean())) for role, record in validation.items()}
    before = validate()
    print(f"before training: {before} (no pack {bare})", flush=True)
    optimiser = torch.optim.SparseAdam(values.parameters(), lr=args.lr)
    losses, started = [], time.perf_counter()
    order = np.random.default_rng(0).permutation(len(own))
    with progress_bar(len(own), "training values", unit="pos") as bar:
        for batch in np.array_split(order, max(1, len(own) // args.batch)):
            loss = nll(as_torch({n: array[batch] for n, array in positions.items()}), own[batch]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    after = validate()
    print(f"one pass: train NLL {np.mean(losses):.4f}, {after} ({seconds:.0f} s)", flush=True)
    learned = values.weight.detach().numpy()
    write_values(args.pack, str(block), learned, args.out_pack)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.memorize.value_training", *sys.argv[1:]]),
        "training_positions": len(own),
        "training_positions_elsewhere": int((own < 0).sum()),
        "entries_learned": int(np.count_nonzero(np.abs(learned).sum(axis=1))),
        "entries": len(learned),
        "train_nll_first_last_tenth": [
            float(np.mean(losses[: len(losses) // 10])),
            float(np.mean(losses[-(len(losses) // 10) :])),
        ],
        "seconds": seconds,
        "validation": {
            role: {
                "documents": [args.validation] if role == "validation" else args.elsewhere,
                "tokens": len(record["target"]),
                "without_pack": bare[role],
                "before": before[role],
                "after": after[role],
                "after_over_without_pack": after[role] / bare[role],
            }
            for role, record in validation.items()
        },
        "elsewhere_train": args.elsewhere_train,
        "gate": args.gate,
        "max_distance": args.max_distance,
        "residual_distance_scale": args.residual_distance_scale,
        "pack": str(args.out_pack),
    }
    print(f"written: {args.out_pack}, {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
