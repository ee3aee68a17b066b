"""Reading text with a memory pack loaded against the teacher's own forward over the same windows:
tokens/s of each, side by side (alternating, median of the repeats) in one process, for each key index
the pack's stores may use; and the recall@k of each index on the queries the reading made, at the k the
layer searches (its ``topk``, or ``next_token_topk`` when it mixes next tokens in).

python -m benchmarks.memorize.reading STUDENT PACK TEXT [--indexes exact faiss] [--tokens 4096]
    [--memory-read '{"next_token_weight": 0.7, "next_token_topk": 1024}']

STUDENT: an export; PACK: a pack made for it (dmt-memorize); TEXT: a text file the tokens are taken from
(held-out text: the queries are what the student makes on text it never stored). The teacher is the one
of ``conf/teacher/smollm2.yaml``. Writes ``--out`` (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module

from benchmarks.memorize.throughput import forward_windows
from dmt.files import read_text_file, write_json
from dmt.model.loading import load_teacher
from dmt.model.persistence import load_pretrained
from dmt.model.surgery import memory_layers

SETTINGS = ("tokens", "window", "stride", "batch_size", "repeats", "recall_queries")


def recorded_queries(model, read) -> dict[int, np.ndarray]:
    """The queries ``(N, Dk)`` each memory layer of ``model`` searched its store with during ``read()``."""
    seen: dict[int, list[np.ndarray]] = {}
    originals = {}
    for block, layer in memory_layers(model).items():
        store = layer.store
        originals[block] = store.search_torch

        def recording(queries, k, by_magnitude=False, block=block, search=store.search_torch):
            seen.setdefault(block, []).append(queries.detach().cpu().float().numpy())
            return search(queries, k, by_magnitude)

        store.search_torch = recording
    try:
        read()
    finally:
        for layer in memory_layers(model).values():
            del layer.store.search_torch  # the class's method again
    return {block: np.concatenate(chunks) for block, chunks in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--indexes", nargs="+", default=["exact", "faiss"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recall-queries", type=int, default=2048)
    parser.add_argument(
        "--memory-read", type=json.loads, default=None, help="reading settings (JSON): dmt-eval's memory_read"
    )
    parser.add_argument("--out", type=Path, default=Path("results/memorize/reading.json"))
    args = parser.parse_args()
    with initialize_config_module("dmt.conf", version_base="1.3"):
        teacher = load_teacher(compose("eval").teacher)
    students, loading_s = {}, {}
    for backend in args.indexes:
        started = time.perf_counter()
        students[backend], tokenizer = load_pretrained(
            args.student, memory=args.pack, memory_index={"backend": backend}, memory_read=args.memory_read
        )
        loading_s[backend] = time.perf_counter() - started
    input_ids = torch.tensor(tokenizer(read_text_file(args.text))["input_ids"][: args.tokens])
    settings = (args.window, args.stride, args.batch_size)
    runs = {"teacher": lambda: forward_windows(teacher, input_ids, *settings)}
    runs |= {
        f"student, {b}": lambda m=m: forward_windows(m, input_ids, *settings) for b, m in students.items()
    }
    # The first round warms up (faiss calibrates nprobe on its first search) and is not counted; the
    # queries of that round are recorded for the recall.
    queries = {
        b: recorded_queries(m, lambda m=m: forward_windows(m, input_ids, *settings))
        for b, m in students.items()
    }
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    rates = {name: input_ids.numel() / statistics.median(t) for name, t in timings.items()}
    recall = {}
    for backend, model in students.items():
        for block, layer in memory_layers(model).items():
            sample = queries[backend][block]
            sample = sample[:: max(1, len(sample) // args.recall_queries)]
            recall[f"{backend}, layer {block}"] = {
                "queries": len(sample),
                "k": layer.searched_k,
                "recall_at_k": layer.store.recall(sample, layer.searched_k),
                "entries": len(layer.store),
                "index_state": layer.store.index_state,
            }
    result = {
        "command": " ".join(
            [
                "python -m benchmarks.memorize.reading",
                *(str(path) for path in (args.student, args.pack, args.text)),
                "--indexes",
                *args.indexes,
                *(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in SETTINGS),
                *([] if args.memory_read is None else ["--memory-read", f"'{json.dumps(args.memory_read)}'"]),
            ]
        ),
        "tokens": input_ids.numel(),
        "loading_s": loading_s,
        "seconds": timings,
        "tokens_per_second": rates,
        "over_teacher": {name: rate / rates["teacher"] for name, rate in rates.items() if name != "teacher"},
        "recall": recall,
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
