"""The quality runner (subprocesses stubbed) and the quality_* experiments it runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import benchmarks.quality.runner as runner
import dmt.config  # noqa: F401  (resolvers)
from benchmarks.quality.__main__ import main
from benchmarks.quality.collect import VARIANTS
from dmt.conf import CONF_DIR


def compose_experiment(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="distill", overrides=[f"experiment={name}", "paths.output_dir=/unused"])


def test_max_time_strings():
    assert runner.max_time(60) == "00:01:00:00"
    assert runner.max_time(0.25) == "00:00:00:15"
    assert runner.max_time(1441.5) == "01:00:01:30"
    with pytest.raises(ValueError, match="--budget-minutes"):
        runner.max_time(0)


def test_every_configuration_has_all_variants():
    assert runner.configurations() == ["all", "upper"]
    for configuration in runner.configurations():
        for variant in VARIANTS:
            assert (runner.EXPERIMENTS / f"{runner.experiment_name(configuration, variant)}.yaml").is_file()


@pytest.mark.parametrize("configuration", ["upper", "all"])
def test_variants_differ_only_in_what_replaces_the_mlps(configuration):
    memory, removed, lowrank = (
        OmegaConf.to_container(compose_experiment(f"quality_{configuration}_{v}"), resolve=False)
        for v in VARIANTS
    )
    assert memory["swap"]["type"] == "featural" and memory["swap"]["store"]["init"] == "ffn"
    assert memory["swap"]["blocks"] == {"upper": "-10:", "all": "all"}[configuration]
    assert memory["teacher"]["gguf_file"] and memory["trainer"]["max_time"] == "00:01:00:00"
    assert memory["distill"]["trainable"] == lowrank["distill"]["trainable"] == "memory"
    assert removed["distill"]["trainable"] == "all"
    # Low-rank width: matched to the memory layer's projections (upper); with no projections to match,
    # the dense budget of the all-MLP target (44.7% of the teacher) instead.
    # rank is a setting of lowrank layers alone (absent: null); the other variants have none.
    assert lowrank["swap"]["store"].pop("rank", None) == {"upper": None, "all": 100}[configuration]
    # Same teacher, data, evaluation, budget and every other memory and distillation setting.
    for variant, cfg in (("memory", memory), ("removed", removed), ("lowrank", lowrank)):
        assert cfg["swap"].pop("type") == {"memory": "featural"}.get(variant, variant)
        cfg["distill"].pop("trainable")
    assert removed == memory and lowrank == memory


def fake_distill(calls: list[list[str]], fail: set[str] = frozenset()):
    """Stands in for the ``python -m dmt.distill`` subprocess: writes the run's summary.json, or fails."""

    def run(command, stdout, stderr, env):
        calls.append(command)
        overrides = dict(arg.split("=", 1) for arg in command[3:])
        if overrides["experiment"] in fail:
            return subprocess.CompletedProcess(command, 1)
        layer_type = overrides["experiment"].rsplit("_", 1)[1].replace("memory", "featural")
        summary = {
            "steps": 5,
            "tokens_seen": 640,
            "fit_seconds": 30.0,
            "teacher_dense_parameters": 100,
            "student_dense_parameters": 90,
            "teacher_blocks": 4,
            "swapped_layers": {"2": layer_type, "3": layer_type},
            "memory_entries": 0,
            "evaluation": {"teacher": 10.0, "student": 12.0},
        }
        (Path(overrides["hydra.run.dir"]) / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(command, 0)

    return run


def test_runner_runs_every_variant_then_collects(tmp_path, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner.subprocess, "run", fake_distill(calls))
    argv = ["--budget-minutes", "0.5", "--max-steps", "7", "--configs", "upper", "--out", str(tmp_path)]
    assert main([*argv, "--", "teacher=tiny_llama", "data.batch_size=2"]) == 0
    assert [c[3] for c in calls] == [f"experiment=quality_upper_{v}" for v in VARIANTS]
    assert calls[0][1:3] == ["-m", "dmt.distill"]  # the installed package's app: no checkout needed
    assert calls[0][4:] == [
        f"hydra.run.dir={tmp_path.resolve() / 'runs' / 'upper_memory'}",
        "trainer.max_time=00:00:00:30",
        "trainer.max_steps=7",
        "teacher=tiny_llama",
        "data.batch_size=2",
    ]
    record = json.loads((tmp_path / "runs" / "upper_lowrank" / "quality_run.json").read_text())
    assert record["returncode"] == 0 and record["wall_seconds"] >= 0 and record["configuration"] == "upper"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["budget_minutes"] == 0.5 and len(results["runs"]) == 3
    assert results["configurations"][0]["configuration"] == "upper"
    assert results["configurations"][0]["lowrank_ratio"] == pytest.approx(1.2)
    assert "| upper | 90.0% |" in capsys.readouterr().out

    # Finished runs with the same command are kept; a changed budget runs them again.
    main([*argv, "--", "teacher=tiny_llama", "data.batch_size=2"])
    assert len(calls) == 3
    main([*argv[:1], "1", *argv[2:], "--", "teacher=tiny_llama", "data.batch_size=2"])
    assert len(calls) == 6


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(runner.subprocess, "run", fake_distill(calls, fail={"quality_upper_removed"}))
    assert main(["--configs", "upper", "--out", str(tmp_path)]) == 1
    assert len(calls) == 3
    assert "removed (failed)" in (tmp_path / "results.md").read_text()


def test_bad_arguments_fail_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match="--configs"):
        main(["--configs", "middle", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--budget-minutes"):
        main(["--budget-minutes", "-1", "--out", str(tmp_path)])
    (tmp_path / "runs" / "upper_memory").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by benchmarks.quality"):
        main(["--configs", "upper", "--out", str(tmp_path)])


def test_a_run_killed_midway_is_replaced(tmp_path, monkeypatch):
    def killed(command, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.subprocess, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--configs", "upper", "--out", str(tmp_path)])
    calls: list[list[str]] = []
    monkeypatch.setattr(runner.subprocess, "run", fake_distill(calls))
    assert main(["--configs", "upper", "--out", str(tmp_path)]) == 0 and len(calls) == 3
