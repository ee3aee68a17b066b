"""How much of the next-token mix a query should get, by how near its nearest entries are: a fixed λ
(kNN-LM's) harms text of another domain, whose queries also find neighbours in the pack. Each document is
read once with the pack, recording per scored token the student's log-probabilities (its residual read
within each of ``--residual-radii``, and off: the student without the pack, as a built read with a
negative ``max_distance`` reads), and per head its ``--k`` nearest entries' distances and next tokens;
every gate is then scored from those records exactly as :func:`dmt.layers.next_tokens.mix_next_tokens`
mixes the ``--ks`` nearest, without reading again.

python -m benchmarks.memorize.next_token_gate STUDENT PACK --validation NAME --elsewhere NAME ...
    [--k 1024] [--ks 64 1024] [--temperatures 0.01 0.02] [--weights 0.1 0.2 0.3] [--radii 0.05 0.1]
    [--scales 0.02 0.05] [--softnesses 0.01] [--residual-radii none 0.05] [--max-harm 1.01] [--records DIR]
    [--index exact]

Documents are the first ``--chars`` (validation) or ``--elsewhere-chars`` characters of NAME (``source/unit``
of a ``dmt.data`` source), read with windows of 512 tokens and stride 256 as ``dmt-eval`` reads; elsewhere
documents come from training sources (never a held-out one). A gate sets each head's λ from its nearest
distance ``d``: ``fixed`` λ; ``radius`` λ for ``d <= r``; ``exp`` λ·exp(-d/s); ``sigmoid``
λ·σ((r - d)/s). The chosen gate is the best on the validation document among those whose perplexity
elsewhere is at most ``--max-harm`` × the student's without the pack. Writes ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.memorize.read_settings import document_text, optional_float
from dmt.evaluation.perplexity import window_batch, windows
from dmt.files import write_json
from dmt.model.persistence import load_student
from dmt.packs.reading import inserting_layers, read_with


@torch.no_grad()
def records(
    student: Any, tokenizer: Any, text: str, k: int, radii: list[float | None]
) -> dict[str, np.ndarray]:
    """Per scored token of ``text``: ``target (S,)``; the student's ``log_p@R (S,)`` of it before any mix,
    its residual read within each radius ``R`` of ``radii`` (``max_distance``); and per head its ``k``
    nearest entries' ``distances (S, H, k)`` and ``tokens (S, H, k)`` (-1: unknown)."""
    (layer,) = inserting_layers(student).values()  # the pack's layer; featural ones read as built
    found: dict[str, np.ndarray] = {}
    read_next_tokens = layer.read_next_tokens

    def keep(nearest: Any, device: torch.device) -> Any:  # the layer's search, before the mix
        found["distances"] = nearest.distances[:, :k].copy()
        found["tokens"] = layer.store.next_tokens(nearest.ids[:, :k])
        return read_next_tokens(nearest, device)

    layer.read_next_tokens = keep
    logits_before: list[torch.Tensor] = []
    hook = student.register_forward_hook(
        lambda module, args, output: logits_before.append(output.logits.float()), prepend=True
    )
    ids = torch.tensor(tokenizer(text)["input_ids"])
    rows: dict[str, list[np.ndarray]] = {"target": [], "distances": [], "tokens": []}
    rows |= {log_p_key(radius): [] for radius in radii}
    try:
        for begin, end, first in windows(len(ids), 512, 256):
            batch, _ = window_batch(ids, [(begin, end, first)])  # (1, T)
            scored = slice(first - begin - 1, end - begin - 1)  # logits at j predict token j + 1
            target = ids[first:end]
            rows["target"].append(target.numpy())
            for n, radius in enumerate(radii):  # the first forward also records the neighbours
                read_with(student, {"max_distance": radius, "next_token_weight": 0.5 if n == 0 else 0.0})
                logits_before.clear()
                student(input_ids=batch)
                log_p = torch.log_softmax(logits_before[0][0, scored], dim=-1)  # (S, V)
                rows[log_p_key(radius)].append(log_p.gather(1, target[:, None])[:, 0].numpy())
            heads = layer.heads
            for name in ("distances", "tokens"):
                per_head = found[name].reshape(end - begin, heads, -1)  # (T, H, k)
                rows[name].append(per_head[scored])
    finally:
        hook.remove()
        layer.read_next_tokens = read_next_tokens
    return {name: np.concatenate(parts) for name, parts in rows.items()}


OFF = "off"  # the residual read off: nothing read but the mix


def log_p_key(radius: float | str | None) -> str:
    return f"log_p@{radius}"


def gate(kind: str, weight: float, scale: float | None, nearest: np.ndarray) -> np.ndarray:
    """Each head's λ ``(S, H)`` from its nearest distance ``nearest (S, H)`` (+inf: none known)."""
    if kind == "fixed":
        return np.where(np.isfinite(nearest), weight, 0.0)
    if kind == "radius":
        return np.where(nearest <= scale, weight, 0.0)
    if kind == "exp":
        return weight * np.exp(-np.clip(nearest, 0.0, 1e3) / scale)  # as the built read clamps
    if kind == "sigmoid":  # scale = (r, s)
        radius, softness = scale
        return weight / (1.0 + np.exp(-(radius - np.minimum(nearest, 1e3)) / softness))
    raise ValueError(kind)


def memory_reads(record: dict[str, np.ndarray], temperature: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each head's nearest distance ``(S, H)`` (+inf: none known) and its memory's probability of the
    target ``(S, H)``: a softmax of ``-distance / temperature`` over the known next tokens of the ``k``
    nearest."""
    distances, tokens = record["distances"][..., :k].astype(np.float64), record["tokens"][..., :k]
    known = tokens >= 0
    nearest = np.where(known, distances, np.inf).min(axis=2)  # (S, H)
    shift = np.where(np.isfinite(nearest), nearest, 0.0)[..., None]  # a stable softmax
    weights = np.where(known, np.exp(-(distances - shift) / temperature), 0.0)  # (S, H, k)
    weights /= np.maximum(weights.sum(axis=2, keepdims=True), 1e-300)
    p_memory = (weights * (tokens == record["target"][:, None, None])).sum(axis=2)  # (S, H)
    return nearest, p_memory


def perplexity_of(reads: list[tuple[np.ndarray, np.ndarray, np.ndarray]], lam_of: Any) -> float:
    """Perplexity of the targets under ``(1 - mean_h λ_h) p_student + Σ_h λ_h / H p_memory,h`` for
    ``reads`` of ``(log_p, nearest, p_memory)``, as :func:`dmt.layers.next_tokens.mix_next_tokens` mixes."""
    nll, count = 0.0, 0
    for log_p, nearest, p_memory in reads:
        lam = lam_of(nearest)  # (S, H)
        p = (1.0 - lam.mean(axis=1)) * np.exp(log_p) + (lam * p_memory).mean(axis=1)
        nll -= float(np.log(np.maximum(p, 1e-30)).sum())
        count += len(log_p)
    return math.exp(nll / count)


def gates(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every gate of the grid: fixed and radius λ, exponential and sigmoid decay."""
    grid = []
    for weight, temperature, k in itertools.product(args.weights, args.temperatures, args.ks):
        base = {"weight": weight, "temperature": temperature, "k": k}
        grid.append({**base, "kind": "fixed", "scale": None})
        grid += [{**base, "kind": "radius", "scale": r} for r in args.radii]
        grid += [{**base, "kind": "exp", "scale": s} for s in args.scales]
        grid += [
            {**base, "kind": "sigmoid", "scale": (r, s)}
            for r, s in itertools.product(args.radii, args.softnesses)
        ]
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--elsewhere", nargs="+", required=True)
    parser.add_argument("--chars", type=int, default=32000)
    parser.add_argument("--elsewhere-chars", type=int, default=6000)
    parser.add_argument("--k", type=int, default=1024, help="neighbours recorded")
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024], help="neighbours mixed")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.01, 0.02])
    parser.add_argument("--radii", type=float, nargs="+", default=[0.03, 0.05, 0.07, 0.1])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05])
    parser.add_argument("--softnesses", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--residual-radii", type=optional_float, nargs="+", default=[None, 0.05])
    parser.add_argument("--max-harm", type=float, default=1.01)
    parser.add_argument("--records", type=Path, help="directory caching the documents' records")
    parser.add_argument("--index", default="exact", help="the pack's index while recording (exact, faiss)")
    parser.add_argument("--out", type=Path, default=Path("results/memorize/next_token_gate.json"))
    args = parser.parse_args()
    record: dict[str, Any] = {
        "command": "python -m benchmarks.memorize.next_token_gate " + shlex.join(sys.argv[1:])
    }

    # Records: each document read once with the pack, once without
    texts = {args.validation: document_text(args.validation, args.chars)}
    texts |= {name: document_text(name, args.elsewhere_chars) for name in args.elsewhere}
    recs = read_records(args, texts)
    bare, tokenizer = load_student(args.student)
    for name, rec in recs.items():
        rec[log_p_key(OFF)] = bare_log_p(bare, tokenizer, texts[name])
    without = np.concatenate([recs[name][log_p_key(OFF)] for name in args.elsewhere])
    elsewhere_base = float(np.exp(-without.mean()))
    record["elsewhere"] = {"documents": args.elsewhere, "without_pack": elsewhere_base}
    record["validation"] = {"document": args.validation, "rows": []}

    # Gates: the validation play and elsewhere, each from the records, under each residual radius
    memory = {
        (name, t, k): memory_reads(r, t, k)
        for name, r in recs.items()
        for t, k in itertools.product(args.temperatures, args.ks)
    }
    for radius in [*args.residual_radii, OFF]:
        key = log_p_key(radius)
        residual = np.concatenate([recs[name][key] for name in args.elsewhere])
        record["elsewhere"][f"residual_read_ratio@{radius}"] = (
            float(np.exp(-residual.mean())) / elsewhere_base
        )
        record["validation"][f"residual_read@{radius}"] = float(np.exp(-recs[args.validation][key].mean()))
        for setting in gates(args):

            def lam_of(nearest: np.ndarray, s: dict[str, Any] = setting) -> np.ndarray:
                return gate(s["kind"], s["weight"], s["scale"], nearest)

            t, k = setting["temperature"], setting["k"]
            mixed = {name: (recs[name][key], *memory[name, t, k]) for name in texts}
            row = {
                "residual_radius": radius,
                **setting,
                "validation": perplexity_of([mixed[args.validation]], lam_of),
                "elsewhere_ratio": perplexity_of([mixed[n] for n in args.elsewhere], lam_of) / elsewhere_base,
            }
            record["validation"]["rows"].append(row)
            print(json.dumps(row), flush=True)
    allowed = [row for row in record["validation"]["rows"] if row["elsewhere_ratio"] <= args.max_harm]
    record["chosen"] = {
        kind: min((r for r in allowed if r["kind"] == kind), key=lambda r: r["validation"], default=None)
        for kind in ("fixed", "radius", "exp", "sigmoid")
    }
    print(json.dumps(record["chosen"], indent=1))
    write_json(args.out, record)


def read_records(args: argparse.Namespace, texts: dict[str, str]) -> dict[str, dict[str, np.ndarray]]:
    """Each document's records (:func:`records`), cached in ``args.records`` when given."""
    recs, missing = {}, []
    for name in texts:
        cached = args.records / f"{name.replace('/', '__')}.npz" if args.records else None
        if cached is not None and cached.exists():
            recs[name] = dict(np.load(cached))
        else:
            missing.append(name)
    if missing:
        index = {"backend": args.index}
        student, tokenizer = load_student(args.student, memory=args.pack, memory_index=index)
        read_with(student, {"next_token_topk": args.k})
        for name in missing:
            recs[name] = records(student, tokenizer, texts[name], args.k, args.residual_radii)
            if args.records:
                args.records.mkdir(parents=True, exist_ok=True)
                np.savez(args.records / f"{name.replace('/', '__')}.npz", **recs[name])
            print(f"{name}: {len(recs[name]['target'])} tokens recorded", flush=True)
    return recs


@torch.no_grad()
def bare_log_p(student: Any, tokenizer: Any, text: str) -> np.ndarray:
    """The log-probability of each scored token under the student without a pack."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    parts = []
    for begin, end, first in windows(len(ids), 512, 256):
        batch, _ = window_batch(ids, [(begin, end, first)])
        logits = student(input_ids=batch).logits[0, first - begin - 1 : end - begin - 1].float()
        parts.append(torch.log_softmax(logits, -1).gather(1, ids[first:end, None])[:, 0].numpy())
    return np.concatenate(parts)


if __name__ == "__main__":
    main()
