"""``python -m dmt.bench.throughput``: distillation tokens/s of every shipped experiment's student beside a
dense student, timed side by side in one process.

For each experiment (``conf/experiment/<name>.yaml``, composed as ``distill.py experiment=<name>``):

- **Batches** are real token blocks: the first ``warmup + steps + 3`` batches of the experiment's own
  training loader (``data.block_size`` x ``data.batch_size``, shuffled with the run's seed), the same
  sequence for both students. Every step gets a new batch, as in training: a repeated batch would find
  its own earlier inserts in an associative store and skip the insert work.
- **The memory student** is built as the run builds it: ``validate_config``, ``build_student`` after
  seeding with ``cfg.seed``, and ``DistillationModule(**cfg.distill)`` (so ``trainable`` freezes what the
  run freezes). For the baseline experiments (``quality_*_removed``, ``*_lowrank``) it is the baseline.
- **The dense student** is the same teacher clone with nothing swapped, under the same loss and optimiser
  settings, and its kept MLPs of the swapped blocks stand where the swapped layers would: the hidden loss
  compares them with the teacher's MLPs, they form the ``memory_lr`` optimiser group and, when the
  experiment trains only the swapped layers (``trainable: memory``), they are the only trained part. Both
  students therefore run the same loss and backpropagate to the same depth; the difference is the
  swapped layers' own cost (search, gather, inserts, write-back, commit) against the MLPs'.
- **The optimiser** is the module's own ``configure_optimizers`` under the run's ``trainer`` settings
  (AdamW groups and learning rates), with the run's gradient clipping (``trainer.gradient_clip_val``).
- **A step** is :func:`dmt.bench.measure.distillation_step`: loss including the teacher forward, backward,
  value write-back, optimiser step, store commit. Steps of the two students alternate
  (:func:`~dmt.bench.measure.paired_median_seconds`), so both share the load of a shared machine.
- **Stores start as the run's do** (empty for associative layers, seeded from the MLPs for ``init: ffn``)
  and the warm-up steps are training steps that fill them; the timed steps go on filling or evicting, as
  training does. The report gives the entries before and after the timed steps and the evictions during
  them: a store that evicts replaces entries (for hnsw, an in-place graph update, far slower than an
  insert), so the steady state of a long run is measured only once the warm-up has filled the stores.

The memory student of ``--profile`` experiments, and of any that misses the target ratio, is then profiled
beside the dense one: :func:`~dmt.bench.profile.profile_step` splits one step into the layers' phases
(search, gather, inserts, ...), and :func:`staged_step` times a step's stages (teacher forward, student
forward and loss, backward, write-back, optimiser, commit) without a profiler's overhead.

``--threads`` sets torch's thread count for the whole measurement (hnswlib searches on every core
either way): on a host shared with other jobs, threads that wait on each other can dominate a step.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from dmt.bench.cli import TARGETS, machine_info, write_report
from dmt.bench.measure import distillation_step, paired_median_seconds
from dmt.bench.profile import profile_step
from dmt.config import validate_config
from dmt.distill.module import DistillationModule
from dmt.layers import LayerConfig
from dmt.model.families import get_mlp
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.surgery import build_student, memory_entries, memory_layers, trainable_parameters

EXPERIMENTS = (
    "associative_upper_third",
    "associative_upper",
    "quickstart",
    "quality_upper_memory",
    "quality_all_memory",
)
PROFILED = ("associative_upper_third",)
TARGET_RATIO = TARGETS["distill_throughput_min_ratio"]
# Batches beyond warm-up and timed steps: two for profile_step (a warm-up and the profiled step), one for
# the staged step.
PROFILE_BATCHES = 3


def compose_experiment(name: str, overrides: list[str]) -> DictConfig:
    """The distill config of ``experiment=<name>`` with ``overrides`` applied after it."""
    with initialize_config_module("dmt.conf", version_base="1.3"):
        return compose("distill", overrides=[f"experiment={name}", *overrides])


def training_batches(cfg: DictConfig, tokenizer: Any, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches ``{"input_ids", "attention_mask"}`` ``(B, T)`` of the run's training
    loader."""
    datamodule: pl.LightningDataModule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    datamodule.setup("fit")
    batches = list(itertools.islice(iter(datamodule.train_dataloader()), count))
    if len(batches) < count:
        raise ValueError(
            f"data: the training split gives {len(batches)} batches, the benchmark needs {count}; "
            "lower --steps/--warmup or raise data.max_train_blocks"
        )
    return batches


def distill_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.distill`` as the keyword arguments of :class:`DistillationModule`."""
    return OmegaConf.to_container(cfg.distill, resolve=True)  # type: ignore[return-value]


def memory_student(
    cfg: DictConfig, teacher: PreTrainedModel, layer_configs: dict[int, LayerConfig]
) -> DistillationModule:
    """The experiment's student, built as ``dmt.distill.run.distill`` builds it."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    student = build_student(teacher, layer_configs)
    return DistillationModule(student, teacher, **distill_settings(cfg))


def dense_student(cfg: DictConfig, teacher: PreTrainedModel, blocks: list[int]) -> DistillationModule:
    """The teacher's clone with its MLPs kept, whose MLPs of ``blocks`` take the swapped layers' part in
    the loss and the optimiser (and, for ``trainable: memory``, are the only trained parameters)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    module = DistillationModule(student, teacher, **distill_settings(cfg))
    module.swapped_layers = {index: get_mlp(student, index) for index in blocks}
    if cfg.distill.trainable == "memory":
        for mlp in module.swapped_layers.values():
            mlp.requires_grad_(True)
    return module


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notes (accelerators, tips) left out: each student builds a trainer."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_optimizer(module: DistillationModule, cfg: DictConfig) -> torch.optim.Optimizer:
    """The module's AdamW under the run's trainer settings, clipping gradients before each step as the
    run's ``trainer.gradient_clip_val`` does."""
    with tempfile.TemporaryDirectory() as root, quiet_lightning():
        module.trainer = instantiate(
            cfg.trainer,
            default_root_dir=root,  # the config's is Hydra's run directory, unset outside a Hydra app
            logger=False,
            callbacks=[],
            plugins=[],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    optimizer: torch.optim.Optimizer = module.configure_optimizers()["optimizer"]
    clip = cfg.trainer.get("gradient_clip_val")
    if clip:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]

        def clip_gradients(*_: Any) -> None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)

        optimizer.register_step_pre_hook(clip_gradients)
    module.on_fit_start()  # deferred store writes, committed after each optimiser step as in training
    return optimizer


@contextmanager
def forward_seconds(model: torch.nn.Module) -> Iterator[list[float]]:
    """Wall seconds of each forward of ``model`` inside the block, appended to the yielded list."""
    seconds: list[float] = []
    started: list[float] = []
    handles = [
        model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
        model.register_forward_hook(lambda *_: seconds.append(time.perf_counter() - started.pop())),
    ]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def staged_step(
    module: DistillationModule, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> dict[str, float]:
    """One :func:`~dmt.bench.measure.distillation_step`, seconds by stage."""
    assert module.teacher is not None  # every shipped experiment distils
    marks = [time.perf_counter()]
    optimizer.zero_grad(set_to_none=True)
    with forward_seconds(module.teacher) as teacher_seconds:
        loss = module.losses(batch)["loss"]
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    module.memory.write_back_values()
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    module.memory.commit()
    marks.append(time.perf_counter())
    forward, backward, write_back, optimiser, commit = (b - a for a, b in itertools.pairwise(marks))
    return {
        "teacher_forward": sum(teacher_seconds),
        "student_forward_loss": forward - sum(teacher_seconds),
        "backward": backward,
        "value_write_back": write_back,
        "optimiser": optimiser,
        "commit": commit,
        "total": marks[-1] - marks[0],
    }


def step_profile(
    module: DistillationModule, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Phases (cProfile, two batches) and stages (one batch) of a step of ``module``."""
    phases = profile_step(lambda: distillation_step(module, optimizer, next(batches)))
    stages = staged_step(module, optimizer, next(batches))
    return {
        "phases": phases,
        "stages": stages,
        "dominant_stage": max((stage for stage in stages if stage != "total"), key=stages.__getitem__),
    }


def timed_steps(
    modules: dict[str, DistillationModule],
    optimizers: dict[str, torch.optim.Optimizer],
    feeds: dict[str, Iterator[dict[str, torch.Tensor]]],
    warmup: int,
    steps: int,
) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds of a step of each student (alternating) after ``warmup`` steps each; the memory
    student's entries at the start, after the warm-up and after the timed steps, and the evictions during
    the timed steps (none: the stores were still filling, not yet churning as a full store does)."""

    def stepper(role: str) -> Callable[[], None]:
        return lambda: distillation_step(modules[role], optimizers[role], next(feeds[role]))

    def evictions() -> int:
        return sum(layer.store.stats.evictions for layer in memory_layers(modules["memory"].student).values())

    steppers = {role: stepper(role) for role in modules}
    entries: dict[str, int] = {"at_start": memory_entries(modules["memory"].student)}
    for _ in range(warmup):  # here rather than in paired_median_seconds, to count the entries after it
        for step in steppers.values():
            step()
    entries["before_timed_steps"] = memory_entries(modules["memory"].student)
    evicted = evictions()
    seconds = paired_median_seconds(steppers, 0, steps)
    entries["after_timed_steps"] = memory_entries(modules["memory"].student)
    entries["evictions_in_timed_steps"] = evictions() - evicted
    return seconds, entries


def measure_experiment(
    name: str, overrides: list[str], warmup: int, steps: int, profile: bool, cache: dict[str, Any]
) -> dict[str, Any]:
    """Tokens/s of the memory and dense students of experiment ``name``, their ratio, and (if ``profile``
    or the ratio misses the target) where their step time goes. ``cache`` keeps teachers and batches
    between experiments that share them."""
    cfg = compose_experiment(name, overrides)
    layer_configs = validate_config(cfg)
    teacher_key = json.dumps(OmegaConf.to_container(cfg.teacher, resolve=True), sort_keys=True)
    if teacher_key not in cache:
        cache[teacher_key] = (load_tokenizer(cfg.teacher), load_teacher(cfg.teacher))
    tokenizer, teacher = cache[teacher_key]
    count = warmup + steps + PROFILE_BATCHES
    data_key = json.dumps([teacher_key, OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, count])
    if data_key not in cache:
        cache[data_key] = training_batches(cfg, tokenizer, count)
    batches = cache[data_key]
    modules = {
        "dense": dense_student(cfg, teacher, sorted(layer_configs)),
        "memory": memory_student(cfg, teacher, layer_configs),
    }
    optimizers = {role: run_optimizer(module, cfg) for role, module in modules.items()}
    feeds = {role: iter(batches) for role in modules}  # the same batches, in the same order
    seconds, entries = timed_steps(modules, optimizers, feeds, warmup, steps)
    batch, seq = batches[0]["input_ids"].shape
    result: dict[str, Any] = {
        "overrides": [f"experiment={name}", *overrides],
        "batch": batch,
        "seq": seq,
        "trainable": cfg.distill.trainable,
        "swapped_layers": {str(i): c.type for i, c in layer_configs.items()},
        "memory_entries": entries,
    }
    for role, module in modules.items():
        result[role] = {
            "median_s": seconds[role],
            "tokens_per_s": batch * seq / seconds[role],
            "trainable_parameters": trainable_parameters(module.student),
        }
    result["ratio"] = result["memory"]["tokens_per_s"] / result["dense"]["tokens_per_s"]
    result["meets_target"] = result["ratio"] >= TARGET_RATIO
    if profile or not result["meets_target"]:
        profiles = {role: step_profile(modules[role], optimizers[role], feeds[role]) for role in modules}
        stages = {role: p["stages"] for role, p in profiles.items()}
        excess = {stage: stages["memory"][stage] - stages["dense"][stage] for stage in stages["memory"]}
        result["profile"] = {**profiles, "memory_minus_dense_stages_s": excess}
    return result


def table(report: dict[str, Any]) -> str:
    """Tokens/s of each experiment's students, their ratio, and what dominates the profiled steps."""
    lines = [
        f"distillation steps, median of {report['settings']['steps']} after {report['settings']['warmup']} "
        f"warm-up (students alternating); target memory/dense >= {TARGET_RATIO}",
        f"{'experiment':<26}{'B x T':>9}{'dense tok/s':>13}{'memory tok/s':>14}{'ratio':>8}  target",
    ]
    for name, r in report["experiments"].items():
        shape = f"{r['batch']}x{r['seq']}"
        lines.append(
            f"{name:<26}{shape:>9}{r['dense']['tokens_per_s']:>13.0f}{r['memory']['tokens_per_s']:>14.0f}"
            f"{r['ratio']:>8.2f}  {'meets' if r['meets_target'] else 'MISSES'}"
        )
    for name, r in report["experiments"].items():
        if "profile" not in r:
            continue
        lines.append(f"{name}: one step by stage, seconds (phases: fractions of a cProfiled step)")
        for role in ("dense", "memory"):
            p = r["profile"][role]
            lines.append(f"  {role:<7} " + ", ".join(f"{k} {v:.2f}" for k, v in p["stages"].items()))
            lines.append(
                f"  {'':<7} " + ", ".join(f"{k} {v:.2f}" for k, v in p["phases"]["fractions"].items())
            )
        excess = r["profile"]["memory_minus_dense_stages_s"]
        lines.append("  memory - dense: " + ", ".join(f"{k} {v:+.2f}" for k, v in excess.items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dmt.bench.throughput", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--experiments", nargs="+", default=list(EXPERIMENTS), help="names in conf/experiment"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per student")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps per student first")
    parser.add_argument(
        "--profile",
        nargs="*",
        default=list(PROFILED),
        help="experiments whose steps are profiled (besides any that misses the target)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own); on a shared host one thread avoids contention",
    )
    parser.add_argument("--out", type=Path, default=Path("throughput.json"), help="JSON report path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every experiment")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "command": " ".join(
            ["python -m dmt.bench.throughput", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "settings": {"steps": args.steps, "warmup": args.warmup, "overrides": args.overrides},
        "target_ratio": TARGET_RATIO,
        "experiments": {},
    }
    cache: dict[str, Any] = {}
    for name in args.experiments:
        started = time.perf_counter()
        result = measure_experiment(
            name, args.overrides, args.warmup, args.steps, name in args.profile, cache
        )
        result["wall_s"] = time.perf_counter() - started
        report["experiments"][name] = result
        write_report(report, args.out)  # after each experiment: an interrupted run keeps what it measured
        print(f"{name}: ratio {result['ratio']:.2f} in {result['wall_s']:.0f} s", flush=True)
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
