"""A cache student's memory read as kNN-LM reads its datastore: a design study for a read mode the student
does not have yet.

python -m benchmarks.memorize.next_token_read STUDENT PACK --validation NAME --held-out NAME ...

The cache of ``experiment=associative_cache`` adds the next-token embeddings of its top-k entries to the
residual stream (a log-linear mix, through the final norm). kNN-LM instead mixes a distribution over the
tokens that followed its neighbours into the output probabilities. This script measures what the second
way would give with the student's own queries and the pack's own keys: each scored position's query of the
memory layer (recorded during the student's forward), its ``max(--ks)`` nearest entries of PACK by exact
search (faiss flat, the layer's cosine distance), the token each entry's value stands for (the document's
token after the entry's offset, the document re-tokenised and checked against the pack's digest), and

    p = (1 - lam - lam_self) * p_model + lam * p_pack + lam_self * p_self,

``p_pack`` a softmax of ``-distance / temperature`` over the k nearest entries summed per token, ``p_self``
the same over the document's own entries of the windows read before (what a cache that inserts a window's
entries after reading it holds, as ``dmt-long-document`` reads). ``p_model`` is the teacher's (the
student's output projection at zero) or the student's with the pack read as it reads it today. Settings
are chosen on the validation document alone, then the held-out documents are read with them. Documents:
the first ``--chars`` characters, windows of 512 and stride 256 as ``dmt-eval`` reads.

``--long NAME ...``: long documents (their first ``--long-tokens`` tokens) read with the document's own
entries alone (no pack: ``lam = 0``, the settings chosen on the validation document), per quarter as
``dmt-long-document`` reports. Writes ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.memorize.knn_lm import knn_probability, mixture_nll
from benchmarks.memorize.read_settings import document_text
from dmt.evaluation.perplexity import window_batch, windows
from dmt.files import write_json
from dmt.kernel.pack_files import SHARDS, read_pack_json, read_shard
from dmt.model.persistence import load_student
from dmt.model.surgery import memory_layers
from dmt.packs.reading import token_digest

TEMPERATURES = (0.005, 0.01, 0.02, 0.05)
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
SELF_LAMBDAS = (0.0, 0.05, 0.1, 0.15)
SELF_KS = (16, 64, 256)
SELF_TEMPERATURES = (0.01, 0.02, 0.05, 0.1)


@torch.no_grad()
def scored_positions(
    student, layer, input_ids: torch.Tensor, bases: tuple[str, ...] = ("student", "teacher")
) -> dict[str, torch.Tensor]:
    """Per scored position (in order): the layer's query ``(N, Dk)``, the target ``(N,)``, the window that
    scores it ``(N,)`` and its log-probability under the student reading as it does (``student``) and with
    its output at zero (``teacher``) for each of ``bases``, windows of 512, stride 256, four per forward."""
    recorded, search = [], layer.search

    def recording(queries, *args, **kwargs):
        recorded.append(queries.detach().float().clone())
        return search(queries, *args, **kwargs)

    layer.search = recording
    weight = layer.out_proj.weight.detach().clone()  # (C, C)
    out = {name: [] for name in ("queries", "targets", "windows", *bases)}
    spans = windows(input_ids.numel(), 512, 256)
    try:
        for start in range(0, len(spans), 4):
            chunk = spans[start : start + 4]
            ids, mask = window_batch(input_ids, chunk)  # (B, T)
            logprobs = {}
            for name in bases:
                gain = 1.0 if name == "student" else 0.0
                layer.out_proj.weight.copy_(weight * gain)
                recorded.clear()
                logits = student(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
                logprobs[name] = F.log_softmax(logits, -1)
            queries = torch.cat(recorded).view(*ids.shape, -1)  # (B, T, Dk)
            for row, (begin, end, first) in enumerate(chunk):
                rows = slice(first - begin - 1, end - begin - 1)  # positions whose next token is scored
                target = input_ids[first:end]
                out["queries"].append(queries[row, rows])
                out["targets"].append(target)
                out["windows"].append(torch.full_like(target, start + row))
                for name in bases:
                    out[name].append(logprobs[name][row, rows].gather(1, target[:, None])[:, 0].double())
    finally:
        layer.out_proj.weight.copy_(weight)
        del layer.search  # the class's method again
    return {name: torch.cat(parts) for name, parts in out.items()}


def pack_keys_and_tokens(pack: Path, block: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Every entry's key ``(M, Dk)`` (unit length) and the token its value stands for ``(M,)``: the token
    after the one it was read at, from the document re-tokenised and checked against the pack."""
    raw = read_pack_json(pack)
    keys, tokens = [], []
    for document in raw["documents"]:
        input_ids = torch.tensor(tokenizer(document_text(document["name"], None))["input_ids"])
        if token_digest(input_ids) != document["digest"]:
            raise ValueError(f"{document['name']}: its tokens are not the ones {pack} was read from")
        count = int(document["entries"].get(block, 0))
        arrays = read_shard(
            pack / SHARDS / document["shard"], block, count, None, None, True, ("keys", "offsets")
        )
        keys.append(arrays["keys"].astype(np.float32))
        tokens.append(input_ids.numpy()[arrays["offsets"] + 1])
    keys = np.concatenate(keys)
    faiss.normalize_L2(keys)
    return keys, np.concatenate(tokens)


def self_neighbours(scored: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distances ``(N, k)`` and tokens ``(N, k)`` of each position's nearest entries of the same
    document in windows read before its own (a cache inserts a window's entries after reading it); -1:
    none."""
    unit = F.normalize(scored["queries"], dim=1)  # (N, Dk)
    similarity = unit @ unit.T  # (N, N)
    window = scored["windows"]
    similarity.masked_fill_(window[None, :] >= window[:, None], -2.0)
    found, where = similarity.topk(min(k, len(unit)), dim=1)
    return 1 - found, torch.where(found > -2, scored["targets"][where], -1)


def nll(docs: list[dict], base: str, settings: dict) -> float:
    """Summed NLL of ``docs`` under ``settings`` (k, temperature, lam; self_k, self_temperature, lam_self),
    each document's distributions computed once per setting of theirs (``d["p"]``)."""
    total = 0.0
    for d in docs:
        pack = ("distances", "tokens", settings["k"], settings["temperature"])
        own = ("self_distances", "self_tokens", settings["self_k"], settings["self_temperature"])
        for key in (pack, own):
            if key not in d["p"]:
                d["p"][key] = knn_probability(d[key[0]], d[key[1]], d["targets"], key[2], key[3])
        memories = [(settings["lam"], d["p"][pack]), (settings["lam_self"], d["p"][own])]
        total += mixture_nll(d[base], memories).item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--held-out", nargs="+", required=True)
    parser.add_argument("--chars", type=int, default=32000)
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 128, 1024])
    parser.add_argument("--long", nargs="*", default=[])
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("results/memorize/next_token_read.json"))
    args = parser.parse_args()
    student, tokenizer = load_student(args.student, memory=args.pack, memory_index={"backend": "faiss"})
    ((block, layer),) = memory_layers(student).items()
    if layer.cfg.metric != "cosine" or layer.cfg.inserted_values != "next_token":
        raise ValueError(f"{args.student}: the study reads a cosine cache of next tokens (block {block})")

    # Entries: the pack's keys and the tokens their values stand for
    keys, tokens = pack_keys_and_tokens(args.pack, str(block), tokenizer)

    # Reading: each document's queries and log-probabilities
    names = [args.validation, *args.held_out]
    texts = {name: document_text(name, args.chars) for name in names}
    texts |= {name: document_text(name, None) for name in args.long}
    scored, forward_seconds = {}, {}
    for name in [*names, *args.long]:
        started = time.perf_counter()
        input_ids = torch.tensor(tokenizer(texts[name])["input_ids"])
        if name in args.long:
            input_ids = input_ids[: args.long_tokens]
        bases = ("teacher",) if name in args.long else ("student", "teacher")
        scored[name] = scored_positions(student, layer, input_ids, bases)
        forward_seconds[name] = time.perf_counter() - started
        print(f"{name}: {len(scored[name]['targets'])} tokens, {forward_seconds[name]:.0f} s", flush=True)

    # Neighbours: the pack's by exact search, the document's own earlier positions
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    started = time.perf_counter()
    for d in scored.values():
        queries = F.normalize(d["queries"], dim=1).numpy()
        similarity, ids = index.search(queries, max(args.ks))  # (N, K) each
        d["distances"] = torch.from_numpy(1 - similarity)
        d["tokens"] = torch.from_numpy(np.where(ids >= 0, tokens[ids.clip(0)], -1))
        d["self_distances"], d["self_tokens"] = self_neighbours(d, max(SELF_KS))
        d["p"] = {}
    search_seconds = time.perf_counter() - started

    # Settings: the lowest validation NLL, without and with the document's own entries
    validation, held = [scored[args.validation]], [scored[n] for n in args.held_out]
    own_settings = [
        (SELF_KS[0], SELF_TEMPERATURES[0], 0.0),
        *itertools.product(SELF_KS, SELF_TEMPERATURES, SELF_LAMBDAS[1:]),
    ]
    grid = [
        {"k": k, "temperature": t, "lam": lam, "self_k": sk, "self_temperature": st, "lam_self": ls}
        for k, t, lam in itertools.product(args.ks, TEMPERATURES, LAMBDAS)
        for sk, st, ls in own_settings
    ]
    tokens_held = sum(len(d["targets"]) for d in held)
    teacher = -sum(d["teacher"].sum().item() for d in held)
    rows = {"teacher": {"perplexity": math.exp(teacher / tokens_held), "ratio_to_teacher": 1.0}}
    student_nll = -sum(d["student"].sum().item() for d in held)
    rows["student reading the pack as it does"] = {
        "perplexity": math.exp(student_nll / tokens_held),
        "ratio_to_teacher": math.exp((student_nll - teacher) / tokens_held),
    }
    for base, with_self in itertools.product(("teacher", "student"), (False, True)):
        candidates = [g for g in grid if (g["lam_self"] > 0) == with_self]
        scores = {i: nll(validation, base, g) for i, g in enumerate(candidates)}
        chosen = candidates[min(scores, key=scores.get)]
        value = nll(held, base, chosen)
        label = f"{base} + next tokens of the pack" + (
            " + of the document's own earlier entries" if with_self else ""
        )
        rows[label] = {
            "settings": chosen,
            "validation_perplexity": math.exp(min(scores.values()) / len(validation[0]["targets"])),
            "perplexity": math.exp(value / tokens_held),
            "ratio_to_teacher": math.exp((value - teacher) / tokens_held),
        }
        print(label, json.dumps(rows[label]), flush=True)
    long = {}
    if args.long:
        candidates = [g for g in grid if g["lam"] == LAMBDAS[0]]
        candidates = [{**g, "lam": 0.0} for g in candidates]
        scores = {i: nll(validation, "teacher", g) for i, g in enumerate(candidates)}
        chosen = candidates[min(scores, key=scores.get)]
        long["settings"] = chosen
        for name in args.long:
            d = scored[name]
            quarters = torch.arange(len(d["targets"])) * 4 // len(d["targets"])  # (N,)
            quarter_rows = []
            for quarter in range(4):
                part = {key: d[key][quarters == quarter] for key in ("targets", "teacher")}
                part |= {key: d[key][quarters == quarter] for key in ("self_distances", "self_tokens")}
                part |= {key: d[key][quarters == quarter] for key in ("distances", "tokens")}
                part["p"] = {}
                base = -part["teacher"].sum().item()
                read = nll([part], "teacher", chosen)
                quarter_rows.append(
                    {
                        "tokens": len(part["targets"]),
                        "teacher": math.exp(base / len(part["targets"])),
                        "ratio_to_teacher": math.exp((read - base) / len(part["targets"])),
                    }
                )
            whole = -d["teacher"].sum().item()
            ratio = math.exp((nll([d], "teacher", chosen) - whole) / len(d["targets"]))
            long[name] = {"quarters": quarter_rows, "whole_ratio_to_teacher": ratio}
            print(name, json.dumps(quarter_rows), flush=True)
    result = {
        "command": "python -m benchmarks.memorize.next_token_read " + shlex.join(sys.argv[1:]),
        "pack_entries": len(keys),
        "held_out": {"documents": args.held_out, "tokens": tokens_held},
        "validation": args.validation,
        "rows": rows,
        "long_documents": long,
        "seconds": {"forwards (two per batch)": forward_seconds, "exact searches": search_seconds},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
