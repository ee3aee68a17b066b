"""Collecting runs into the comparison: synthetic run directories → results.json and the markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality.__main__ import main
from benchmarks.quality.collect import (
    RUN_RECORD,
    collect,
    configuration_rows,
    describe_layers,
    markdown_tables,
    read_run,
    variant_of,
)

TEACHER_PPL = 40.0


def fake_run(
    root: Path,
    name: str,
    layers: list[int],
    layer_type: str,
    student_ppl: float,
    *,
    record: dict | None = None,
    with_eval: bool = True,
    blocks: int = 30,
    multiply_add_fraction: float | None = None,
) -> Path:
    """A run directory as distill.py (and, with ``record``, the quality runner) leaves it."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    teacher_params = 1_000_000
    student_params = teacher_params - 10_000 * len(layers) * (layer_type != "lowrank")
    summary = {
        "steps": 120,
        "tokens_seen": 120 * 1024,
        "fit_seconds": 600.0,
        "wall_seconds": 700.0,
        "teacher_dense_parameters": teacher_params,
        "student_dense_parameters": student_params,
        "dense_parameter_fraction": student_params / teacher_params,
        "trainable_parameters": 5_000,
        "swapped_layer_parameters": 5_000,
        "teacher_blocks": blocks,
        "swapped_layers": {str(i): layer_type for i in layers},
        "memory_entries": 1536 * len(layers) if layer_type == "featural" else 0,
        "evaluation": {"teacher": TEACHER_PPL, "student": student_ppl, "ablated": 1000.0},
    }
    if multiply_add_fraction is not None:  # as swap_arithmetic writes it, less the blocks
        mlp = 3 * 576 * 1536 * len(layers)
        summary["arithmetic"] = {
            "blocks": {},
            "total": round(multiply_add_fraction * mlp),
            "mlp": mlp,
            "mlp_fraction": multiply_add_fraction,
            "search_estimated": False,
        }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if with_eval:
        rows = [
            {"name": n, "perplexity": p, "ratio_to_teacher": p / TEACHER_PPL, "tokens": 8000, "nll": 1.0}
            for n, p in (("teacher", TEACHER_PPL), ("student", student_ppl), ("ablated", 1000.0))
        ]
        (run_dir / "eval.json").write_text(json.dumps({"rows": rows}))
    if record is not None:
        (run_dir / RUN_RECORD).write_text(json.dumps(record))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    upper = list(range(20, 30))
    return [
        fake_run(tmp_path, "upper_memory", upper, "featural", 60.0, multiply_add_fraction=1.1734),
        fake_run(tmp_path, "upper_removed", upper, "removed", 80.0, multiply_add_fraction=0.0),
        fake_run(
            tmp_path, "upper_lowrank", upper, "lowrank", 50.0, with_eval=False, multiply_add_fraction=0.375
        ),
        fake_run(
            tmp_path,
            "all_memory",
            list(range(30)),
            "featural",
            200.0,
            record={"configuration": "all", "variant": "memory", "wall_seconds": 900.0},
        ),
    ]


def test_read_run(runs):
    memory = read_run(runs[0])
    assert memory.status == "ok" and memory.configuration == "upper 10" and memory.variant == "memory"
    assert memory.ratio == pytest.approx(1.5) and memory.ablated_ratio == pytest.approx(25.0)
    assert memory.memory_entries == 15_360 and memory.dense_parameter_fraction == pytest.approx(0.9)
    assert memory.multiply_add_fraction == 1.1734 and memory.multiply_adds_estimated is False
    assert (memory.steps, memory.tokens_seen, memory.fit_minutes, memory.wall_minutes) == (
        120,
        122_880,
        10,
        700 / 60,
    )
    # Without eval.json the summary's held-out perplexities are used.
    assert read_run(runs[2]).ratio == pytest.approx(1.25)
    # The runner's record names the configuration and gives the wall time of the whole subprocess.
    everything = read_run(runs[3])
    assert everything.configuration == "all" and everything.wall_minutes == 15
    # A summary from before the arithmetic was recorded.
    assert everything.multiply_add_fraction is None and everything.multiply_adds_estimated is None


def test_a_run_without_summary_is_failed(tmp_path):
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / RUN_RECORD).write_text(
        json.dumps({"configuration": "upper", "variant": "lowrank"})
    )
    failed = read_run(tmp_path / "crashed")
    assert (failed.status, failed.configuration, failed.variant, failed.ratio) == (
        "failed",
        "upper",
        "lowrank",
        None,
    )
    assert "lowrank (failed)" in markdown_tables([failed])


def test_configuration_rows_put_the_baselines_beside_the_memory_run(runs):
    upper, everything = configuration_rows([read_run(r) for r in runs])
    assert upper["configuration"] == "upper 10" and upper["layers"] == list(range(20, 30))
    assert upper["memory_ratio"] == pytest.approx(1.5) and upper["multiply_add_fraction"] == 1.1734
    assert upper["removed_ratio"] == pytest.approx(2.0) and upper["lowrank_ratio"] == pytest.approx(1.25)
    assert upper["budget"]["memory"] == {
        "fit_minutes": 10,
        "wall_minutes": 700 / 60,
        "steps": 120,
        "tokens": 122_880,
    }
    assert everything["configuration"] == "all" and everything["removed_ratio"] is None
    assert everything["multiply_add_fraction"] is None


def test_collect_writes_json_and_markdown(runs, tmp_path):
    results = collect(runs, tmp_path / "out", {"budget_minutes": 10})
    assert results["settings"] == {"budget_minutes": 10}
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["configurations"][0]["memory_ratio"] == 1.5
    assert written["configurations"][0]["multiply_add_fraction"] == 1.1734
    assert [run["multiply_add_fraction"] for run in written["runs"]] == [1.1734, 0.0, 0.375, None]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Teacher held-out perplexity: 40.00\n" in table
    assert (
        "| upper 10 | 90.0% | 15,360 | 1.17 | 1.500 | 2.000 | 1.250 | 10.0 min, 120 steps, 122,880 tokens |"
        in table
    )
    assert "| all | 70.0% | 46,080 | — | 5.000 | — | — |" in table
    assert "| upper_lowrank | lowrank | 10/30 | 100.0% | 5,000 | 0 | 0.38 | 50.00 |" in table
    assert "| upper_removed | removed | 10/30 | 90.0% | 5,000 | 0 | 0.00 | 80.00 |" in table


def test_collect_only_cli(runs, tmp_path, capsys):
    assert main(["--collect-only", *map(str, runs), "--out", str(tmp_path / "table")]) == 0
    assert "| upper 10 |" in capsys.readouterr().out
    assert (tmp_path / "table" / "results.md").is_file()


def test_names_of_layer_sets_and_variants():
    assert describe_layers(list(range(4)), 4) == "all"
    assert describe_layers([2, 3], 4) == "upper 2"
    assert describe_layers([0, 2], 4) == "blocks 0,2"
    assert variant_of(["removed", "removed"]) == "removed"
    assert variant_of(["lowrank"]) == "lowrank"
    assert variant_of(["featural", "associative"]) == "memory"
    assert variant_of(["featural", "removed"]) == "memory"


def test_heldout_sources_get_their_own_table(tmp_path):
    upper = list(range(20, 30))
    runs = []
    for variant, student in (("memory", 11.0), ("removed", 14.0)):
        layer_type = "featural" if variant == "memory" else "removed"
        run_dir = fake_run(tmp_path, variant, upper, layer_type, student, with_eval=False)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["heldout_evaluation"] = {"bbc_news": {"teacher": 20.0, "student": 2 * student}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        runs.append(read_run(run_dir))
    assert runs[0].heldout_ratios == {"bbc_news": 1.1}
    table = markdown_tables(runs)
    assert "| configuration | bbc_news |" in table
    assert "| upper 10 | 1.100 / 1.400 / — |" in table


def test_an_estimated_multiply_add_fraction_is_marked(tmp_path):
    run_dir = fake_run(tmp_path, "hnsw", [3], "featural", 60.0, blocks=4, multiply_add_fraction=0.25)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["arithmetic"]["search_estimated"] = True  # an hnsw store: graph hops estimated
    (run_dir / "summary.json").write_text(json.dumps(summary))
    run = read_run(run_dir)
    assert run.multiply_adds_estimated is True
    assert "| upper 1 | 99.0% | 1,536 | ≈0.25 | 1.500 |" in markdown_tables([run])
