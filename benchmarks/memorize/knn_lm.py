"""kNN-LM on the teacher (Khandelwal et al. 2020): the baseline a memory pack must beat on the memorised
domain. Keys are the teacher's final hidden states (the input of its output embedding), values the tokens
that followed; a read interpolates ``lambda * p_knn + (1 - lambda) * p_teacher``, ``p_knn`` a softmax of
``-distance / temperature`` over the ``k`` nearest keys, summed per token. ``k``, ``temperature`` and
``lambda`` are chosen on a validation document, never on the held-out ones.

python -m benchmarks.memorize.knn_lm build DATASTORE --exclude GLOB ... [--window 512] [--stride 448]
python -m benchmarks.memorize.knn_lm read DATASTORE --validation NAME --held-out NAME ... [--chars 32000]

``build`` reads the Shakespeare source (``dmt.data.corpus``) less the excluded documents with the same
windows as ``dmt-memorize`` (one key per token that has a successor, read where it is scored), one file per
document, so an interrupted build resumes. ``read`` scores the validation and held-out documents (their
first ``--chars`` characters) with sliding windows as ``dmt-eval`` does, searches a faiss IVF index of the
datastore, and writes ``--out``: perplexities, the chosen settings, recall@k against exact search, and
tokens/s of the teacher alone and of the teacher with the search and interpolation.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from dmt.data.corpus import head, read_source
from dmt.evaluation.perplexity import window_batch, windows
from dmt.files import write_json
from dmt.model.loading import load_teacher, load_tokenizer

SOURCE = "shakespeare"
KS = (8, 32, 128, 512, 1024)
TEMPERATURES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(20))


def teacher_and_tokenizer():
    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("eval").teacher
    return load_teacher(cfg).eval(), load_tokenizer(cfg)


@torch.no_grad()
def hidden_and_logprobs(teacher, input_ids: torch.Tensor, window: int, stride: int, batch_size: int):
    """Final hidden states ``(N, C)`` of the scored positions (each predicts the token after it), the
    teacher's log-probability ``(N,)`` of that token, and the tokens ``(N,)``, in position order."""
    spans = windows(input_ids.numel(), window, stride)
    hidden, logprobs, targets = [], [], []
    for start in range(0, len(spans), batch_size):
        chunk = spans[start : start + batch_size]
        ids, mask = window_batch(input_ids, chunk)  # (B, T)
        h = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
        logits = teacher.get_output_embeddings()(h).float()  # (B, T, V)
        for row, (begin, end, first) in enumerate(chunk):
            rows = slice(first - begin - 1, end - begin - 1)  # positions whose next token is scored
            target = input_ids[first:end]
            hidden.append(h[row, rows].float())
            logprobs.append(F.log_softmax(logits[row, rows], -1).gather(1, target[:, None])[:, 0])
            targets.append(target)
    return torch.cat(hidden), torch.cat(logprobs), torch.cat(targets)


def build(args: argparse.Namespace) -> None:
    teacher, tokenizer = teacher_and_tokenizer()
    documents = [
        d for d in read_source(SOURCE) if not any(fnmatch.fnmatchcase(d.name, p) for p in args.exclude)
    ]
    args.datastore.mkdir(parents=True, exist_ok=True)
    for number, document in enumerate(documents):
        path = args.datastore / f"{document.name.replace('/', '__')}.npz"
        if path.exists():
            continue
        started = time.perf_counter()
        input_ids = torch.tensor(tokenizer(document.text)["input_ids"])
        hidden, _, targets = hidden_and_logprobs(
            teacher, input_ids, args.window, args.stride, args.batch_size
        )
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, keys=hidden.half().numpy(), values=targets.int().numpy())
        os.replace(temporary, path)  # a document is in the datastore whole or not at all
        seconds = time.perf_counter() - started
        rate = len(targets) / seconds
        print(f"{number + 1}/{len(documents)} {document.name}: {len(targets)} keys, {rate:.0f} tok/s")


def knn_probability(
    distances: torch.Tensor, neighbours: torch.Tensor, targets: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """``p_knn (N,)`` of ``targets (N,)``: a softmax of ``-distance / temperature`` over the ``k`` nearest of
    ``distances (N, K)``, summed over the neighbours whose token (``neighbours (N, K)``) is the target."""
    weights = torch.softmax(-distances[:, :k].double() / temperature, -1)  # (N, k)
    return (weights * (neighbours[:, :k] == targets[:, None])).sum(-1)


def mixture_nll(lm_logprob: torch.Tensor, memories: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Summed NLL under ``(1 - Σ lam) * p_lm + Σ lam * p`` for the ``(lam, p (N,))`` of ``memories``."""
    rest = 1.0 - sum(lam for lam, _ in memories)
    parts = [math.log(rest) + lm_logprob.double()]
    parts += [math.log(lam) + p.clamp_min(1e-30).log() for lam, p in memories if lam > 0]
    return -torch.logsumexp(torch.stack(parts), 0).sum()


def knn_nll(
    distances: torch.Tensor,
    neighbours: torch.Tensor,
    targets: torch.Tensor,
    lm_logprob: torch.Tensor,
    k: int,
    temperature: float,
    lam: float,
) -> torch.Tensor:
    """Summed NLL of ``targets`` under ``lam * p_knn + (1 - lam) * p_lm`` over the ``k`` nearest keys."""
    return mixture_nll(lm_logprob, [(lam, knn_probability(distances, neighbours, targets, k, temperature))])


def read(args: argparse.Namespace) -> None:
    teacher, tokenizer = teacher_and_tokenizer()
    files = sorted(args.datastore.glob("*.npz"))
    stored = [np.load(f) for f in files]
    keys = np.concatenate([s["keys"] for s in stored]).astype(np.float32)  # (M, C)
    values = torch.from_numpy(np.concatenate([s["values"] for s in stored]).astype(np.int64))  # (M,)
    print(f"datastore: {len(files)} documents, {len(keys)} keys")

    # Index: IVF-Flat on squared L2, as the paper's faiss index (there with PQ codes).
    started = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(keys.shape[1]), keys.shape[1], args.nlist)
    sample = np.random.default_rng(0).choice(len(keys), min(len(keys), 64 * args.nlist), replace=False)
    index.train(keys[sample])
    index.add(keys)
    index.nprobe = args.nprobe
    build_seconds = time.perf_counter() - started

    documents = {d.name: d for d in read_source(SOURCE)}
    scored = {}
    for name in [args.validation, *args.held_out]:
        input_ids = torch.tensor(tokenizer(head(documents[name].text, args.chars))["input_ids"])
        started = time.perf_counter()
        hidden, lm_logprob, targets = hidden_and_logprobs(teacher, input_ids, 512, 256, 4)
        forward = time.perf_counter() - started
        started = time.perf_counter()
        distances, ids = index.search(hidden.numpy(), max(KS))  # (N, K) each
        search = time.perf_counter() - started
        neighbours = values[torch.from_numpy(ids).clamp_min(0)]  # (N, K); -1 (too few found) never matches
        neighbours[torch.from_numpy(ids) < 0] = -1
        scored[name] = dict(
            hidden=hidden,
            lm=lm_logprob,
            targets=targets,
            distances=torch.from_numpy(distances),
            neighbours=neighbours,
            forward=forward,
        )
        print(f"{name}: {len(targets)} tokens, forward {forward:.1f} s, search of {max(KS)} {search:.1f} s")

    # Settings: the lowest validation NLL over the grid.
    val = scored[args.validation]
    grid = [(k, t, lam) for k in KS for t in TEMPERATURES for lam in LAMBDAS]
    nlls = {
        g: knn_nll(val["distances"], val["neighbours"], val["targets"], val["lm"], *g).item() for g in grid
    }
    k, temperature, lam = min(nlls, key=nlls.get)

    # Held out: teacher and kNN-LM with the chosen settings; recall of the IVF search against exact.
    held = [scored[n] for n in args.held_out]
    tokens = sum(len(s["targets"]) for s in held)
    teacher_nll = sum(-s["lm"].sum().item() for s in held)
    knn = sum(
        knn_nll(s["distances"], s["neighbours"], s["targets"], s["lm"], k, temperature, lam).item()
        for s in held
    )
    # Read cost: the teacher's forward plus a search at the chosen k and the interpolation.
    forward = sum(s["forward"] for s in held)
    started = time.perf_counter()
    for s in held:
        distances, ids = index.search(s["hidden"].numpy(), k)
        neighbours = values[torch.from_numpy(ids).clamp_min(0)]
        knn_nll(torch.from_numpy(distances), neighbours, s["targets"], s["lm"], k, temperature, lam)
    search = time.perf_counter() - started
    queries = torch.cat([s["hidden"] for s in held])[:: max(1, tokens // args.recall_queries)].numpy()
    exact = faiss.IndexFlatL2(keys.shape[1])
    exact.add(keys)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found, strict=True)]))
    result = {
        "command": "python -m benchmarks.memorize.knn_lm " + shlex.join(sys.argv[1:]),
        "datastore": {"documents": len(files), "keys": len(keys), "index_build_seconds": build_seconds},
        "validation": {
            "document": args.validation,
            "teacher_perplexity": math.exp(nlls[(KS[0], TEMPERATURES[0], 0.0)] / len(val["targets"])),
            "knn_lm_perplexity": math.exp(nlls[(k, temperature, lam)] / len(val["targets"])),
        },
        "chosen": {"k": k, "temperature": temperature, "lambda": lam},
        "held_out": {
            "documents": args.held_out,
            "tokens": tokens,
            "teacher_perplexity": math.exp(teacher_nll / tokens),
            "knn_lm_perplexity": math.exp(knn / tokens),
            "ratio_to_teacher": math.exp((knn - teacher_nll) / tokens),
            f"recall@{k}": recall,
            "tokens_per_second": {"teacher": tokens / forward, "knn_lm": tokens / (forward + search)},
        },
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build")
    build_parser.add_argument("datastore", type=Path)
    build_parser.add_argument("--exclude", nargs="*", default=[])
    build_parser.add_argument("--window", type=int, default=512)
    build_parser.add_argument("--stride", type=int, default=448)
    build_parser.add_argument("--batch-size", type=int, default=4)
    read_parser = commands.add_parser("read")
    read_parser.add_argument("datastore", type=Path)
    read_parser.add_argument("--validation", required=True)
    read_parser.add_argument("--held-out", nargs="+", required=True)
    read_parser.add_argument("--chars", type=int, default=32000)
    read_parser.add_argument("--nlist", type=int, default=1024)
    read_parser.add_argument("--nprobe", type=int, default=32)
    read_parser.add_argument("--recall-queries", type=int, default=512)
    read_parser.add_argument("--out", type=Path, default=Path("results/memorize/knn_lm.json"))
    args = parser.parse_args()
    build(args) if args.command == "build" else read(args)


if __name__ == "__main__":
    main()
