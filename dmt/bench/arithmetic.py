"""``python -m dmt.bench.arithmetic [--experiments A B ...] [--out F] [-- overrides]``: how much arithmetic
the student of each experiment does per token in its swapped layers, beside the MLPs they replace.

Builds each experiment's student as a run would (the teacher, the swap, stores seeded by ``init``) and
counts with :func:`dmt.layers.arithmetic.swap_arithmetic`, twice: as the run starts (its stores as seeded;
an empty store searches and reads nothing) and with every store holding ``capacity`` entries (where a
store that inserts ends up). Counted, not timed: the figures are exact for the exact and product indexes
and an estimate for hnsw (marked ``≈``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dmt.layers.arithmetic import layer_multiply_adds, swap_arithmetic
from dmt.layers.base import MemoryLayer

DEFAULT_EXPERIMENTS = (
    "quickstart",
    "quality_upper_memory",
    "quality_upper_lowrank",
    "quality_all_memory",
    "quality_all_lowrank",
    "associative_upper",
    "associative_upper_third",
    "associative_cache",
)


def experiment_arithmetic(experiments: list[str], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Per experiment: ``swap_arithmetic`` of its student as it starts, and ``at_capacity``: the swapped
    layers' multiply-adds over the MLPs' with every store full."""
    from hydra import compose, initialize_config_module

    import dmt.config  # noqa: F401  (registers the ${pkg:...} resolver)
    from dmt.config import validate_config
    from dmt.model.families import mlp_form
    from dmt.model.loading import load_teacher
    from dmt.model.surgery import build_student, swapped_layers

    report: dict[str, dict[str, Any]] = {}
    teachers: dict[str, Any] = {}  # one load per teacher config shared by several experiments
    for experiment in experiments:
        with initialize_config_module("dmt.conf", version_base="1.3"):
            cfg = compose("distill", overrides=[f"experiment={experiment}", *overrides])
        plan = validate_config(cfg)
        key = json.dumps(dict(cfg.teacher), sort_keys=True, default=str)
        if key not in teachers:
            teachers[key] = load_teacher(cfg.teacher)
        student = build_student(teachers[key], plan)
        layers = swapped_layers(student)
        counts = swap_arithmetic(layers, mlp_form(student.config))
        full = sum(
            layer_multiply_adds(layer, layer.store.capacity if isinstance(layer, MemoryLayer) else None).total
            for layer in layers.values()
        )
        counts["at_capacity"] = {
            "total": full,
            "mlp_fraction": full / counts["mlp"] if counts["mlp"] else None,
        }
        report[experiment] = counts
    return report


def format_table(report: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per experiment."""
    lines = [
        "| experiment | swapped blocks | multiply-adds ÷ MLP's, at start | with full stores |",
        "|---|---|---|---|",
    ]
    for experiment, counts in report.items():
        mark = "≈" if counts["search_estimated"] else ""
        start, full = counts["mlp_fraction"], counts["at_capacity"]["mlp_fraction"]
        cells = ["–" if value is None else f"{mark}{value:.3f}" for value in (start, full)]
        lines.append(f"| {experiment} | {len(counts['blocks'])} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m dmt.bench.arithmetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--experiments", nargs="+", default=list(DEFAULT_EXPERIMENTS))
    parser.add_argument("--out", type=Path, help="JSON report path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the distill config (after --)")
    args = parser.parse_args(argv)
    report = experiment_arithmetic(args.experiments, args.overrides)
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
