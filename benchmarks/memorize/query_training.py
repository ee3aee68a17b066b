"""Training the cache's query projection for the gated next-token mix, the pack and its keys left as they
are: does a learned query find better neighbours than the cache's untrained one?

python -m benchmarks.memorize.query_training STUDENT PACK FEATURES --validation NAME [--every 12]
    [--lr 1e-4] [--epochs 2] [--batch 256] [--leaves-to-search 48] [--out FILE]

The student's body is frozen and, with the residual read off (``max_distance`` < 0), its log-probability
of each token does not depend on the pack, so every scored position is recorded once (``FEATURES``, one
``.npz`` per document, reused by later runs): the memory layer's input ``h (C,)``, the last block's output
``x (C,)`` (what the residual read adds to: benchmarks/memorize/value_training.py), the student's log-
probability of the target without the pack and the target. Training positions are every ``--every``-th
window (512 tokens, stride 256, as ``dmt-eval`` scores) of each document the pack holds; each searches the
pack (ScaNN, cosine) with the projection being trained and reads the ``k`` nearest entries of *other*
documents (leave one document out: a document's own entries would hand it its own next tokens). The loss
is the NLL of the gated mix the built read computes (:func:`mixed_nll`, the gate of ``--gate``),
differentiable in the projection through the distances to the neighbours found. Validation: the first
32,000 characters of ``--validation`` (a play the pack does not hold) against the whole pack, before
training and after each epoch. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.memorize.read_settings import document_text
from dmt.data.corpus import read_source
from dmt.evaluation.perplexity import window_batch, windows
from dmt.files import write_json
from dmt.kernel.pack_files import SHARDS, read_shard
from dmt.memory.scann_index import scann_searcher
from dmt.model.families import final_norm
from dmt.model.persistence import load_student
from dmt.packs.files import read_pack
from dmt.packs.reading import inserting_layers

VALIDATION_CHARS = 32000
# The arrays of a pack the study reads: the neighbours' keys and next tokens.
NEXT = ("keys", "tokens")


@torch.no_grad()
def features(
    student: Any, tokenizer: Any, text: str, every: int, batch_size: int = 4
) -> dict[str, np.ndarray]:
    """Per scored position of every ``every``-th window of ``text``: the memory layer's input ``h (S, C)``
    (float16), the last block's output ``x (S, C)`` (the final norm's input, float32), the student's
    ``log_p (S,)`` of the target and the ``target (S,)``."""
    (layer,) = inserting_layers(student).values()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda module, args, name=name: inputs.update({name: args[0]}))
        for name, module in (("h", layer), ("x", final_norm(student)))
    ]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    spans = windows(len(ids), 512, 256)[::every]
    rows: dict[str, list[torch.Tensor]] = {"h": [], "x": [], "log_p": [], "target": []}
    try:
        for start in range(0, len(spans), batch_size):
            chunk = spans[start : start + batch_size]
            batch, mask = window_batch(ids, chunk)  # (B, T)
            logits = student(input_ids=batch, attention_mask=mask).logits.float()  # (B, T, V)
            for row, (begin, end, first) in enumerate(chunk):
                scored = slice(first - begin - 1, end - begin - 1)  # logits at j predict token j + 1
                target = ids[first:end]
                rows["log_p"].append(
                    torch.log_softmax(logits[row, scored], -1).gather(1, target[:, None])[:, 0]
                )
                rows["h"].append(inputs["h"][row, scored].half())
                rows["x"].append(inputs["x"][row, scored].float())
                rows["target"].append(target)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts).numpy() for name, parts in rows.items()}


def pack_arrays(pack: Path, block: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The pack's document names, and per entry of layer ``block`` its key ``(M, Dk)`` (normalised), next
    token ``(M,)`` (-1: unknown) and document ``(M,)`` (an index into the names); every shard is checked
    against its manifest."""
    manifest = read_pack(pack)
    keys, tokens, documents = [], [], []
    for number, document in enumerate(manifest.documents):
        count = document.entries.get(str(block), 0)
        arrays = read_shard(pack / SHARDS / document.shard, str(block), count, None, None, names=NEXT)
        keys.append(arrays["keys"])
        tokens.append(arrays["tokens"])
        documents.append(np.full(count, number))
    stacked = np.concatenate(keys).astype(np.float32)
    stacked /= np.linalg.norm(stacked, axis=1, keepdims=True).clip(1e-12)
    return [d.name for d in manifest.documents], stacked, np.concatenate(tokens), np.concatenate(documents)


def others_first(
    found: np.ndarray, documents: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each row of ``found (N, K')`` (entry ids, nearest first) that are not from the
    row's own document ``own (N,)``, and which of them are real ``(N, k)`` (a row with fewer pads)."""
    other = documents[found] != own[:, None]  # (N, K')
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]  # other documents' entries first, in order
    return np.take_along_axis(found, order, 1), np.take_along_axis(other, order, 1)


def mixed_nll(
    queries: torch.Tensor,
    keys: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    log_p: torch.Tensor,
    target: torch.Tensor,
    gate: dict[str, float],
) -> torch.Tensor:
    """``(N,)`` NLL of the targets under the gated mix of :mod:`dmt.layers.next_tokens` for ``queries (N,
    Dk)`` and their neighbours' normalised ``keys (N, K, Dk)`` and next ``tokens (N, K)`` (-1: unknown),
    ``valid (N, K)``: ``(1 - λ) p + λ p_memory`` with ``λ = weight · exp(-nearest / scale)`` and ``p_memory``
    a softmax of ``-distance / temperature``; cosine distances, differentiable in the queries."""
    distances = 1.0 - torch.einsum("nd,nkd->nk", F.normalize(queries, dim=1), keys)  # (N, K)
    known = valid & (tokens >= 0)
    distances = distances.masked_fill(~known, float("inf"))
    weights = torch.softmax(-distances / gate["temperature"], dim=1).nan_to_num(0.0)
    p_memory = (weights * (tokens == target[:, None])).sum(dim=1)  # (N,)
    nearest = distances.amin(dim=1)
    lam = gate["weight"] * torch.exp(-nearest.clamp_min(0.0) / gate["scale"])  # exp(-inf) = 0: none known
    return -((1.0 - lam) * log_p.exp() + lam * p_memory).clamp_min(1e-30).log()


class PackSearch:
    """The pack's keys under a ScaNN tree (2,048 leaves, as the backend builds a million-key store)."""

    def __init__(self, keys: np.ndarray, tokens: np.ndarray, documents: np.ndarray, leaves_to_search: int):
        self.searcher = scann_searcher(keys, "cosine", 2048, min(len(keys), 2048 * 128))
        self.keys, self.tokens, self.documents = torch.from_numpy(keys), torch.from_numpy(tokens), documents
        self.leaves_to_search = leaves_to_search

    def nll(
        self,
        projection: torch.nn.Module,
        record: dict[str, torch.Tensor],
        gate: dict[str, float],
        own: np.ndarray | None = None,
    ) -> torch.Tensor:
        """:func:`mixed_nll` ``(N,)`` of ``record``'s positions (``h``, ``log_p``, ``target``) reading their
        ``k`` nearest entries; given each position's document ``own (N,)``, those of other documents."""
        queries = projection(record["h"].float())  # (N, Dk)
        found, valid = self.neighbours(queries, int(gate["k"]), own)
        return mixed_nll(
            queries, self.keys[found], self.tokens[found], valid, record["log_p"], record["target"], gate
        )

    def neighbours(
        self, queries: torch.Tensor, k: int, own: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids ``(N, k)`` of the ``k`` nearest entries of ``queries (N, Dk)``, nearest first, and which
        are real ``(N, k)``; given each query's document ``own (N,)``, of other documents only."""
        wanted = k + 512 if own is not None else k  # room for the entries of the query's own document
        host = F.normalize(queries.detach(), dim=1).numpy()
        found = self.searcher.search_batched(
            host, wanted, max(128, 4 * wanted), self.leaves_to_search, True, 256
        )[0]
        found = np.asarray(found, dtype=np.int64)
        if own is not None:
            found, valid = others_first(found, self.documents, own, k)
        else:
            valid = np.ones(found.shape, dtype=bool)
        return torch.from_numpy(found), torch.from_numpy(valid)


def as_torch(record: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in record.items()}


def recorded(
    student: Any, tokenizer: Any, directory: Path, name: str, text: str, every: int
) -> dict[str, np.ndarray]:
    """:func:`features` of document ``name``, read once and kept in ``directory``."""
    path = directory / f"{name.replace('/', '__')}.npz"
    if path.exists():
        return dict(np.load(path))
    started = time.perf_counter()
    record = features(student, tokenizer, text, every)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(path, **record)
    print(f"{name}: {len(record['target'])} positions in {time.perf_counter() - started:.0f} s", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("features", type=Path)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--every", type=int, default=12)
    parser.add_argument(
        "--gate", type=json.loads, default={"weight": 0.7, "scale": 0.02, "temperature": 0.01, "k": 1024}
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--leaves-to-search", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("results/memorize/query_training.json"))
    args = parser.parse_args()

    student, tokenizer = load_student(args.student)
    ((block, layer),) = inserting_layers(student).items()
    names, keys, tokens, documents = pack_arrays(args.pack, block)
    texts = {d.name: d.text for d in read_source(names[0].split("/", 1)[0])}
    train = [recorded(student, tokenizer, args.features, n, texts[n], args.every) for n in names]
    validation = recorded(
        student,
        tokenizer,
        args.features,
        args.validation,
        document_text(args.validation, VALIDATION_CHARS),
        1,
    )
    positions = {name: np.concatenate([record[name] for record in train]) for name in train[0]}
    own = np.concatenate([np.full(len(record["target"]), n) for n, record in enumerate(train)])
    search = PackSearch(keys, tokens, documents, args.leaves_to_search)
    projection = torch.nn.Linear(layer.query_proj.in_features, layer.query_proj.out_features)
    projection.load_state_dict(layer.query_proj.state_dict())
    bare = math.exp(-float(validation["log_p"].mean()))

    def validate() -> float:
        with torch.no_grad():
            parts = [
                search.nll(
                    projection, as_torch({n: a[i : i + 512] for n, a in validation.items()}), args.gate
                )
                for i in range(0, len(validation["target"]), 512)
            ]
        return math.exp(float(torch.cat(parts).mean()))

    history = [{"epoch": None, "validation": validate()}]
    print(f"validation before training: {history[0]['validation']:.3f} (no pack {bare:.3f})", flush=True)
    optimiser = torch.optim.Adam(projection.parameters(), lr=args.lr)
    order_rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        losses, started = [], time.perf_counter()
        for batch in np.array_split(order_rng.permutation(len(own)), max(1, len(own) // args.batch)):
            record = as_torch({name: array[batch] for name, array in positions.items()})
            loss = search.nll(projection, record, args.gate, own=own[batch]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch, "train_nll": float(np.mean(losses)), "validation": validate()})
        print(
            f"epoch {epoch}: train NLL {history[-1]['train_nll']:.4f}, "
            f"validation {history[-1]['validation']:.3f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    result = {
        "command": shlex.join(["python", "-m", "benchmarks.memorize.query_training", *sys.argv[1:]]),
        "training_positions": len(own),
        "validation": {
            "document": args.validation,
            "tokens": len(validation["target"]),
            "without_pack": bare,
        },
        "gate": args.gate,
        "history": history,
    }
    print(f"written: {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
