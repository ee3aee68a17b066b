"""Collect distillation runs into the quality comparison: ``results.json`` and a markdown table.

A run directory is what ``distill.py`` writes (``summary.json``, ``eval.json``), plus, when
:mod:`benchmarks.quality.runner` ran it, ``quality_run.json`` (configuration, variant, command, wall time).
Runs are grouped into *configurations* by the blocks they swap; within one, each run is a *variant*:
``memory`` (memory layers), ``removed`` or ``lowrank`` (the baselines of :mod:`dmt.layers.baselines`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

VARIANTS: tuple[str, ...] = ("memory", "removed", "lowrank")
RUN_RECORD = "quality_run.json"


@dataclass
class RunResult:
    """One run of the comparison, read back from its directory.

    ``ratio`` is the student's held-out perplexity over the teacher's (``eval.json``; lower is better),
    ``ablated_ratio`` the same for the teacher without the swapped MLPs; ``heldout_ratios`` the student's
    ratio on each held-out source of the data (``eval_heldout.json``, ``data=broad``).
    ``multiply_add_fraction`` is the swapped layers' multiply-adds per token over the replaced MLPs' at the
    end of training (``summary.json: arithmetic``, :mod:`dmt.layers.arithmetic`), an estimate where
    ``multiply_adds_estimated`` (an hnsw search). Missing values are ``None``; a run that wrote no
    ``summary.json`` has ``status`` ``"failed"`` and little else.
    """

    run_dir: str
    configuration: str
    variant: str
    status: str = "ok"
    layers: list[int] | None = None
    teacher_blocks: int | None = None
    dense_parameter_fraction: float | None = None
    trainable_parameters: int | None = None
    swapped_layer_parameters: int | None = None
    memory_entries: int | None = None
    multiply_add_fraction: float | None = None
    multiply_adds_estimated: bool | None = None
    teacher_perplexity: float | None = None
    student_perplexity: float | None = None
    ratio: float | None = None
    ablated_ratio: float | None = None
    heldout_ratios: dict[str, float] | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    fit_minutes: float | None = None
    wall_minutes: float | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def variant_of(layer_types: Iterable[str]) -> str:
    """``removed``/``lowrank`` when every swapped layer is that baseline, else ``memory``."""
    types = set(layer_types)
    for baseline in ("removed", "lowrank"):
        if types == {baseline}:
            return baseline
    return "memory"


def describe_layers(layers: Sequence[int], num_blocks: int | None) -> str:
    """A configuration name from the swapped blocks: ``all``, ``upper 10``, or ``blocks 1,3``."""
    if num_blocks and list(layers) == list(range(num_blocks)):
        return "all"
    if num_blocks and layers and list(layers) == list(range(num_blocks - len(layers), num_blocks)):
        return f"upper {len(layers)}"
    return "blocks " + ",".join(map(str, layers)) if layers else "none"


def _ratios(run_dir: Path, summary: dict[str, Any]) -> dict[str, float]:
    """Held-out perplexity per model (teacher, student, ablated) from ``eval.json`` or the summary."""
    evaluation = _read_json(run_dir / "eval.json")
    if evaluation is not None:
        return {row["name"]: float(row["perplexity"]) for row in evaluation["rows"]}
    return {name: float(value) for name, value in (summary.get("evaluation") or {}).items()}


def _heldout_ratios(run_dir: Path, summary: dict[str, Any]) -> dict[str, float] | None:
    """Student ÷ teacher perplexity per held-out source, from ``eval_heldout.json`` or the summary."""
    evaluation = _read_json(run_dir / "eval_heldout.json")
    if evaluation is not None:
        sources = {
            source: {row["name"]: float(row["perplexity"]) for row in result["rows"]}
            for source, result in evaluation.items()
        }
    else:
        sources = summary.get("heldout_evaluation") or {}
    ratios = {
        source: ppl["student"] / ppl["teacher"]
        for source, ppl in sources.items()
        if ppl.get("teacher") and "student" in ppl
    }
    return ratios or None


def read_run(run_dir: str | os.PathLike) -> RunResult:
    """The :class:`RunResult` of one run directory (see module docstring)."""
    run_dir = Path(run_dir)
    record = _read_json(run_dir / RUN_RECORD) or {}
    summary = _read_json(run_dir / "summary.json")
    wall = record.get("wall_seconds")
    if summary is None:
        return RunResult(
            run_dir=str(run_dir),
            configuration=record.get("configuration", run_dir.name),
            variant=record.get("variant", "?"),
            status="failed",
            wall_minutes=wall / 60 if wall is not None else None,
        )
    swapped = {int(i): t for i, t in (summary.get("swapped_layers") or {}).items()}
    layers = sorted(swapped)
    blocks = summary.get("teacher_blocks")
    ppl = _ratios(run_dir, summary)
    teacher = ppl.get("teacher")

    def ratio(name: str) -> float | None:
        return ppl[name] / teacher if teacher and name in ppl else None

    fit = summary.get("fit_seconds")
    wall = wall if wall is not None else summary.get("wall_seconds")
    arithmetic = summary.get("arithmetic") or {}
    fraction = summary.get("dense_parameter_fraction")
    if fraction is None and summary.get("teacher_dense_parameters"):
        fraction = summary["student_dense_parameters"] / summary["teacher_dense_parameters"]
    return RunResult(
        run_dir=str(run_dir),
        configuration=record.get("configuration") or describe_layers(layers, blocks),
        variant=record.get("variant") or variant_of(swapped.values()),
        layers=layers,
        teacher_blocks=blocks,
        dense_parameter_fraction=fraction,
        trainable_parameters=summary.get("trainable_parameters"),
        swapped_layer_parameters=summary.get("swapped_layer_parameters"),
        memory_entries=summary.get("memory_entries"),
        multiply_add_fraction=arithmetic.get("mlp_fraction"),
        multiply_adds_estimated=arithmetic.get("search_estimated"),
        teacher_perplexity=teacher,
        student_perplexity=ppl.get("student"),
        ratio=ratio("student"),
        ablated_ratio=ratio("ablated"),
        heldout_ratios=_heldout_ratios(run_dir, summary),
        steps=summary.get("steps"),
        tokens_seen=summary.get("tokens_seen"),
        fit_minutes=fit / 60 if fit is not None else None,
        wall_minutes=wall / 60 if wall is not None else None,
    )


def configuration_rows(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per configuration (in order of first appearance): the memory run's size, arithmetic and
    budget, and each variant's held-out perplexity ratio (``None`` where that variant did not run or
    failed)."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault(run.configuration, {"configuration": run.configuration, "runs": {}})
        row["runs"][run.variant] = run
    table = []
    for row in rows.values():
        memory = row["runs"].get("memory")
        table.append(
            {
                "configuration": row["configuration"],
                "layers": memory.layers if memory else None,
                "dense_parameter_fraction": memory.dense_parameter_fraction if memory else None,
                "memory_entries": memory.memory_entries if memory else None,
                "multiply_add_fraction": memory.multiply_add_fraction if memory else None,
                "multiply_adds_estimated": memory.multiply_adds_estimated if memory else None,
                **{f"{variant}_ratio": _get(row["runs"].get(variant), "ratio") for variant in VARIANTS},
                "heldout_ratios": {
                    variant: run.heldout_ratios for variant, run in row["runs"].items() if run.heldout_ratios
                },
                "budget": {
                    variant: {
                        "fit_minutes": run.fit_minutes,
                        "wall_minutes": run.wall_minutes,
                        "steps": run.steps,
                        "tokens": run.tokens_seen,
                    }
                    for variant, run in row["runs"].items()
                },
            }
        )
    return table


def _get(run: RunResult | None, field: str) -> Any:
    return getattr(run, field) if run is not None else None


def _fmt(value: Any, spec: str = "", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _multiply_adds(fraction: float | None, estimated: bool | None) -> str:
    """A multiply-add fraction, ``≈``-marked where it rests on an hnsw search estimate."""
    if fraction is None:
        return "—"
    return ("≈" if estimated else "") + _fmt(fraction, ".2f")


def _budget(run: dict[str, Any] | None) -> str:
    if not run:
        return "—"
    return (
        f"{_fmt(run['fit_minutes'], '.1f')} min, {_fmt(run['steps'], ',')} steps, "
        f"{_fmt(run['tokens'], ',')} tokens"
    )


def markdown_tables(runs: Sequence[RunResult]) -> str:
    """The comparison table (one row per configuration) and the per-run table below it, in markdown."""
    teacher = sorted(
        {f"{r.teacher_perplexity:.2f}" for r in runs if r.teacher_perplexity is not None}, key=float
    )
    lines = [
        f"Teacher held-out perplexity: {', '.join(teacher) or '—'}"
        + (" (differs between runs: their evaluation settings differ)" if len(teacher) > 1 else ""),
        "",
        "| configuration | dense parameters (× teacher) | memory entries "
        "| memory layers' multiply-adds ÷ MLP's | memory student ppl ÷ teacher "
        "| removed ppl ÷ teacher | low-rank ppl ÷ teacher | budget used (memory run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in configuration_rows(runs):
        lines.append(
            f"| {row['configuration']} | {_fmt(row['dense_parameter_fraction'], '.1%')} "
            f"| {_fmt(row['memory_entries'], ',')} "
            f"| {_multiply_adds(row['multiply_add_fraction'], row['multiply_adds_estimated'])} "
            f"| {_fmt(row['memory_ratio'], '.3f')} "
            f"| {_fmt(row['removed_ratio'], '.3f')} | {_fmt(row['lowrank_ratio'], '.3f')} "
            f"| {_budget(row['budget'].get('memory'))} |"
        )
    rows = configuration_rows(runs)
    sources = sorted(
        {source for row in rows for ratios in row["heldout_ratios"].values() for source in ratios}
    )
    if sources:
        lines += [
            "",
            "Held-out sources (never trained on), student ppl ÷ teacher, memory / removed / low-rank:",
            "",
            "| configuration | " + " | ".join(sources) + " |",
            "|---|" + "---|" * len(sources),
        ]
        for row in rows:
            cells = [
                " / ".join(
                    _fmt((row["heldout_ratios"].get(variant) or {}).get(source), ".3f")
                    for variant in VARIANTS
                )
                for source in sources
            ]
            lines.append(f"| {row['configuration']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | variant | blocks swapped | dense params (× teacher) | trainable params | memory entries "
        "| multiply-adds ÷ MLP's | ppl | ppl ÷ teacher | ablated ÷ teacher | train min | wall min | steps "
        "| tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        swapped = f"{len(run.layers)}/{run.teacher_blocks}" if run.layers is not None else "—"
        variant = run.variant if run.status == "ok" else f"{run.variant} ({run.status})"
        lines.append(
            f"| {Path(run.run_dir).name} | {variant} "
            f"| {swapped} | {_fmt(run.dense_parameter_fraction, '.1%')} "
            f"| {_fmt(run.trainable_parameters, ',')} | {_fmt(run.memory_entries, ',')} "
            f"| {_multiply_adds(run.multiply_add_fraction, run.multiply_adds_estimated)} "
            f"| {_fmt(run.student_perplexity, '.2f')} | {_fmt(run.ratio, '.3f')} "
            f"| {_fmt(run.ablated_ratio, '.3f')} | {_fmt(run.fit_minutes, '.1f')} "
            f"| {_fmt(run.wall_minutes, '.1f')} | {_fmt(run.steps, ',')} | {_fmt(run.tokens_seen, ',')} |"
        )
    return "\n".join(lines)


def collect(
    run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read ``run_dirs``, write ``results.json`` and ``results.md`` into ``out_dir``; return the results."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings or {},
        "configurations": configuration_rows(runs),
        "runs": [asdict(run) for run in runs],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown_tables(runs) + "\n")
    return results
