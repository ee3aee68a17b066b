"""``python -m dmt.bench.search_breadth``: recall@k and search time of a trained student's hnsw stores at
several ``ef_search``, beside exact search of the same stores, to choose an experiment's search breadth.

The student is built and trained as :mod:`dmt.bench.throughput` builds and steps it (the experiment's own
batches, optimiser, inserts and evictions), for ``--steps`` steps, so that the stores hold what a run's
stores hold at that point. The queries are those the layers searched in the last ``--sample-steps`` steps
(:meth:`MemoryLayer.search_sample`, up to 64 a step per layer). For every hnsw layer and every breadth the
report gives recall@k against exact search over the live entries (:meth:`KNNStore.recall`) and the median
seconds per query of the search itself; ``exact`` is the same search by brute force over the same keys
(:class:`~dmt.memory.exact.ExactIndex`). The derived breadth (``ef_search: null``,
:func:`~dmt.memory.hnsw.derived_ef`) is measured as ``derived``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from dmt.bench.cli import machine_info, write_report
from dmt.bench.measure import distillation_step, median_seconds
from dmt.bench.throughput import compose_experiment, memory_student, run_optimizer, training_batches
from dmt.config import validate_config
from dmt.layers import MemoryLayer
from dmt.memory import KNNStore
from dmt.memory.exact import ExactIndex
from dmt.memory.hnsw import derived_ef
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.surgery import memory_layers

DERIVED = "derived"


def breadth_label(ef: int | None) -> str:
    return DERIVED if ef is None else str(ef)


def exact_copy(store: KNNStore) -> ExactIndex:
    """An exact index over ``store``'s live keys under their slots, on the host."""
    live = store.live_ids()
    index = ExactIndex(store.key_dim, store.metric, store.capacity)
    index.add(live, store.get(live)[0])
    return index


def layer_breadths(
    layer: MemoryLayer, queries: np.ndarray, by_magnitude: bool, efs: list[int | None], repeats: int
) -> dict[str, Any]:
    """Recall@k and seconds per query of ``layer``'s store at each of ``efs``, and of exact search."""
    store, k = layer.store, layer.cfg.topk
    size = len(store)
    rows: dict[str, Any] = {}
    for ef in efs:
        store.set_search_breadth(ef)
        seconds = median_seconds(lambda: store.search(queries, k, by_magnitude), 1, repeats)
        rows[breadth_label(ef)] = {
            "ef": derived_ef(k, size) if ef is None else max(ef, k),
            "recall_at_k": store.recall(queries, k, by_magnitude),
            "us_per_query": seconds / len(queries) * 1e6,
        }
    exact = exact_copy(store)
    queries_t = torch.from_numpy(queries)
    seconds = median_seconds(lambda: exact.search_torch(queries_t, k, by_magnitude), 1, repeats)
    rows["exact"] = {"ef": None, "recall_at_k": 1.0, "us_per_query": seconds / len(queries) * 1e6}
    return {"entries": size, "capacity": store.capacity, "k": k, "queries": len(queries), "breadths": rows}


def measure(
    name: str, overrides: list[str], steps: int, sample_steps: int, efs: list[int | None], repeats: int
) -> dict[str, Any]:
    """Train experiment ``name``'s student ``steps`` steps, then measure each hnsw layer at ``efs``."""
    cfg = compose_experiment(name, overrides)
    layer_configs = validate_config(cfg)
    tokenizer, teacher = load_tokenizer(cfg.teacher), load_teacher(cfg.teacher)
    module = memory_student(cfg, teacher, layer_configs)
    optimizer = run_optimizer(module, cfg)
    layers = {
        index: layer
        for index, layer in memory_layers(module.student).items()
        if layer.store.index_backend == "hnsw"
    }
    if not layers:
        raise ValueError(f"experiment={name}: no memory layer searches an hnsw index")
    samples: dict[int, list[np.ndarray]] = {index: [] for index in layers}
    magnitude: dict[int, bool] = {}
    started = time.perf_counter()
    for step, batch in enumerate(training_batches(cfg, tokenizer, steps)):
        distillation_step(module, optimizer, batch)
        if step >= steps - sample_steps:
            for index, layer in layers.items():
                queries, magnitude[index] = layer.search_sample()
                samples[index].append(queries)
    train_s = time.perf_counter() - started
    report = {
        "overrides": [f"experiment={name}", *overrides],
        "steps": steps,
        "train_s": train_s,
        "shipped_ef_search": OmegaConf.select(cfg, "swap.index.ef_search"),
        "layers": {
            str(index): layer_breadths(layer, np.concatenate(samples[index]), magnitude[index], efs, repeats)
            for index, layer in layers.items()
        },
    }
    report["summary"] = summary(report["layers"])
    return report


def summary(layers: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per breadth: the lowest and the median recall over layers, and the median microseconds per query."""
    labels = next(iter(layers.values()))["breadths"]
    return {
        label: {
            "min_recall": min(layer["breadths"][label]["recall_at_k"] for layer in layers.values()),
            "median_recall": float(
                np.median([layer["breadths"][label]["recall_at_k"] for layer in layers.values()])
            ),
            "median_us_per_query": float(
                np.median([layer["breadths"][label]["us_per_query"] for layer in layers.values()])
            ),
        }
        for label in labels
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{' '.join(report['overrides'])}: {report['steps']} training steps, then per hnsw layer",
        f"{'ef_search':<10}{'ef':>7}{'min recall':>12}{'median recall':>15}{'us/query':>10}",
    ]
    first = next(iter(report["layers"].values()))["breadths"]
    for label, row in report["summary"].items():
        ef = first[label]["ef"]
        lines.append(
            f"{label:<10}{'' if ef is None else ef:>7}{row['min_recall']:>12.3f}{row['median_recall']:>15.3f}"
            f"{row['median_us_per_query']:>10.1f}"
        )
    return "\n".join(lines)


def parse_breadth(text: str) -> int | None:
    if text == DERIVED:
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"an ef_search must be >= 1 or '{DERIVED}', got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dmt.bench.search_breadth", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--experiment", default="associative_upper_third", help="a name in conf/experiment")
    parser.add_argument("--steps", type=int, default=12, help="training steps before measuring")
    parser.add_argument("--sample-steps", type=int, default=4, help="last steps whose queries are the sample")
    parser.add_argument(
        "--ef",
        type=parse_breadth,
        nargs="+",
        default=[16, 32, 64, 128, 256, None],
        help=f"breadths ('{DERIVED}' for the rule)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed searches per breadth")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("search_breadth.json"), help="JSON report path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied after the experiment")
    args = parser.parse_args(argv)
    if not 1 <= args.sample_steps <= args.steps:
        parser.error(f"--sample-steps must lie in [1, --steps={args.steps}], got {args.sample_steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {
        "command": " ".join(
            ["python -m dmt.bench.search_breadth", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        **measure(args.experiment, args.overrides, args.steps, args.sample_steps, args.ef, args.repeats),
    }
    write_report(report, args.out)
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
