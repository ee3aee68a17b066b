"""``dmt.bench.throughput`` on tiny random teachers: the students it compares and the report it writes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dmt.bench.throughput import (
    compose_experiment,
    dense_student,
    main,
    memory_student,
    run_optimizer,
    staged_step,
    table,
)
from dmt.config import validate_config
from dmt.distill.module import DistillationModule
from dmt.model.families import get_mlp
from dmt.model.loading import load_teacher
from dmt.model.surgery import build_student, trainable_parameters


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core host, two threads wait on each other many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_overrides(text_dir) -> list[str]:
    """A tiny Llama teacher (4 blocks of width 64) on a few trimmed plays, short blocks."""
    return [
        "teacher=tiny_llama",
        "swap.read.value_dim=16",  # associative: 4 heads x 16 = the tiny width
        f"data.paths=['{text_dir}']",
        "data.block_size=16",
        "data.batch_size=2",
        "data.max_val_blocks=2",
    ]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def the_run_trainable_parameters(cfg) -> int:
    """Trainable parameters of the student as ``dmt.distill.run.distill`` builds it."""
    teacher = load_teacher(cfg.teacher)
    student = build_student(teacher, validate_config(cfg))
    DistillationModule(student, teacher, **cfg.distill)
    return trainable_parameters(student)


@pytest.mark.parametrize("experiment", ["associative_upper_third", "quickstart"])
def test_memory_student_trains_what_the_run_trains(experiment, text_dir):
    cfg = compose_experiment(experiment, tiny_overrides(text_dir))
    layer_configs = validate_config(cfg)
    module = memory_student(cfg, load_teacher(cfg.teacher), layer_configs)
    assert cfg.distill.trainable == "memory"
    assert trainable_parameters(module.student) == the_run_trainable_parameters(cfg)
    assert trainable_parameters(module.student) == sum(
        count(layer) for layer in module.swapped_layers.values()
    )


def test_dense_student_trains_the_mlps_the_memory_student_swaps(text_dir):
    cfg = compose_experiment("quickstart", tiny_overrides(text_dir))
    cfg.swap.blocks = "-2:"  # the upper two of four blocks, so that some MLPs stay frozen
    blocks = sorted(validate_config(cfg))
    teacher = load_teacher(cfg.teacher)
    module = dense_student(cfg, teacher, blocks)
    assert blocks == [2, 3]
    assert set(module.swapped_layers) == set(blocks)
    assert all(module.swapped_layers[i] is get_mlp(module.student, i) for i in blocks)
    assert trainable_parameters(module.student) == sum(count(get_mlp(module.student, i)) for i in blocks)
    assert not any(p.requires_grad for p in get_mlp(module.student, 0).parameters())
    # The kept MLPs take the swapped layers' part in the optimiser: the memory_lr group.
    groups = {g["name"]: g for g in run_optimizer(module, cfg).param_groups}
    assert set(groups) == {"memory"} and groups["memory"]["lr"] < cfg.distill.memory_lr  # LR warm-up
    assert sum(p.numel() for p in groups["memory"]["params"]) == trainable_parameters(module.student)


def test_dense_student_trains_everything_when_the_experiment_does(text_dir):
    cfg = compose_experiment("quickstart", [*tiny_overrides(text_dir), "distill.trainable=all"])
    teacher = load_teacher(cfg.teacher)
    module = dense_student(cfg, teacher, sorted(validate_config(cfg)))
    assert trainable_parameters(module.student) == trainable_parameters(
        memory_student(cfg, teacher, {}).student
    )
    assert trainable_parameters(module.student) == count(teacher)


def test_staged_step_times_every_stage_and_includes_the_hidden_loss(text_dir):
    cfg = compose_experiment("associative_upper_third", tiny_overrides(text_dir))
    teacher = load_teacher(cfg.teacher)
    input_ids = torch.randint(
        0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    layer_configs = validate_config(cfg)
    for module in (
        dense_student(cfg, teacher, sorted(layer_configs)),
        memory_student(cfg, teacher, layer_configs),
    ):
        assert "hidden" in module.losses(batch)
        stages = staged_step(module, run_optimizer(module, cfg), batch)
        assert all(seconds >= 0 for seconds in stages.values())
        assert math.isclose(stages["total"], sum(v for k, v in stages.items() if k != "total"))
        assert stages["teacher_forward"] > 0 and stages["backward"] > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory, text_dir) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    argv = ["--experiments", "associative_upper_third", "--steps", "1", "--warmup", "1", "--threads", "1"]
    assert main([*argv, "--out", str(out), *tiny_overrides(text_dir)]) == 0
    return json.loads(out.read_text())


def test_report_has_both_students_and_their_ratio(report, text_dir):
    result = report["experiments"]["associative_upper_third"]
    for role in ("dense", "memory"):
        assert result[role]["median_s"] > 0
        assert math.isclose(result[role]["tokens_per_s"], 2 * 16 / result[role]["median_s"])
    assert math.isclose(result["ratio"], result["memory"]["tokens_per_s"] / result["dense"]["tokens_per_s"])
    assert result["meets_target"] == (result["ratio"] >= report["target_ratio"] == 0.8)
    assert (result["batch"], result["seq"]) == (2, 16)
    assert result["swapped_layers"] == {str(i): "associative" for i in range(4)}
    cfg = compose_experiment("associative_upper_third", tiny_overrides(text_dir))
    assert result["memory"]["trainable_parameters"] == the_run_trainable_parameters(cfg)
    assert result["dense"]["trainable_parameters"] > result["memory"]["trainable_parameters"]


def test_stores_start_empty_and_fill_during_training(report):
    entries = report["experiments"]["associative_upper_third"]["memory_entries"]
    assert entries["at_start"] == 0 < entries["before_timed_steps"] <= entries["after_timed_steps"]
    assert entries["evictions_in_timed_steps"] == 0  # capacity 32768: the tiny run never fills a store


def test_profiled_experiment_splits_both_students_steps(report):
    profile = report["experiments"]["associative_upper_third"]["profile"]
    for role in ("dense", "memory"):
        assert profile[role]["dominant_stage"] in profile[role]["stages"]
        assert profile[role]["phases"]["total_s"] > 0
    assert profile["memory"]["phases"]["seconds"]["search"] > 0
    excess = profile["memory_minus_dense_stages_s"]
    assert math.isclose(
        excess["commit"], profile["memory"]["stages"]["commit"] - profile["dense"]["stages"]["commit"]
    )
    assert profile["dense"]["phases"]["seconds"]["search"] == 0
    assert "associative_upper_third" in table(report)
