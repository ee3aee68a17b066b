"""``distill(cfg)``: the whole run from a composed Hydra config, independent of ``@hydra.main``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmt.config import validate_config
from dmt.distill.callbacks import needs_logger
from dmt.distill.module import DistillationModule
from dmt.evaluation.evaluate import evaluate, format_generations, format_table, truncate_texts
from dmt.files import write_json
from dmt.layers.arithmetic import swap_arithmetic
from dmt.model.checkpoint import memory_digest
from dmt.model.families import family_of, mlp_form
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import save_pretrained
from dmt.model.surgery import (
    build_student,
    count_parameters,
    memory_entries,
    swapped_layers,
    trainable_parameters,
)
from dmt.progress import set_quiet

log = logging.getLogger(__name__)
T = TypeVar("T")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a ``callbacks``/``logger`` group."""
    if not group:
        return []
    return [
        instantiate(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def instantiate_callbacks(cfg: DictConfig, has_logger: bool) -> list[pl.Callback]:
    """The ``callbacks`` group; without a logger (``logger=none``), less the ones that need one.

    The default callbacks stay usable with any logger group: a run without a logger drops the monitors
    (``lr_monitor``, ``memory_monitor``) rather than failing on them (Lightning's monitors raise without a
    logger), and says so once.
    """
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if has_logger:
        return callbacks
    dropped = [type(callback).__name__ for callback in callbacks if needs_logger(callback)]
    if dropped:
        log.info("no logger: running without the callbacks that need one (%s)", ", ".join(dropped))
    return [callback for callback in callbacks if not needs_logger(callback)]


def gather_from_ranks(value: T) -> list[T]:
    """``value`` (picklable) of every data-parallel rank, in rank order (``[value]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def uses_teacher(cfg: DictConfig) -> bool:
    return cfg.distill.alpha_kd > 0 or cfg.distill.alpha_hidden > 0


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Distil (or, with only ``alpha_ce``, train) a memory student; return the run summary.

    The summary (also written to ``summary.json``) records what the run cost and what it gave: steps,
    training tokens and seconds, dense parameters of teacher and student, the swapped layers' types and
    parameters, memory entries, their multiply-adds per token at the end of training beside the replaced
    MLPs' (``arithmetic``, see :func:`dmt.layers.arithmetic.swap_arithmetic`), validation and held-out
    perplexities.
    """
    started = time.monotonic()
    if cfg.get("quiet"):
        set_quiet()
    # Everything that can fail on a bad value fails here, before a model is loaded.
    layer_configs = validate_config(cfg)
    tokenizer = load_tokenizer(cfg.teacher)
    try:
        datamodule: pl.LightningDataModule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    except InstantiationException as err:
        # Surface the datamodule's own error (it names the bad path or value), not Hydra's wrapper.
        raise (err.__cause__ or err) from None

    # The corpus is read, checked and packed now (seeded by data.seed alone), so that a bad file is named
    # before a model loads; trainer.fit's own setup then finds it done.
    datamodule.prepare_data()
    datamodule.setup("fit")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"run directory: {output_dir}")
    if "tensorboard" in (cfg.get("logger") or {}):
        print(f"  tensorboard --logdir {cfg.logger.tensorboard.save_dir}")

    pl.seed_everything(cfg.seed, workers=True)
    base = load_teacher(cfg.teacher)
    student = build_student(base, layer_configs)
    teacher = base if uses_teacher(cfg) else None
    teacher_params, student_params = count_parameters(base), count_parameters(student)
    print(
        f"dense parameters: teacher {teacher_params:,}  student {student_params:,} "
        f"({student_params / teacher_params:.1%}); memory layers at {sorted(layer_configs)}, "
        f"{memory_entries(student):,} entries at start"
    )

    module = DistillationModule(
        student,
        teacher,
        **OmegaConf.to_container(cfg.distill, resolve=True),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg, has_logger=bool(loggers)),
        logger=loggers,
        **({"enable_progress_bar": False} if cfg.get("quiet") else {}),
    )
    fit_started = time.monotonic()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.monotonic() - fit_started

    digests = gather_from_ranks(memory_digest(student))
    if len(set(digests)) > 1:
        raise RuntimeError(f"memory replicas diverged across ranks: digests {digests}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    swapped = swapped_layers(student)
    summary: dict[str, Any] = {
        "output_dir": str(output_dir),
        "steps": trainer.global_step,
        "tokens_seen": sum(gather_from_ranks(module.tokens_seen)),
        "fit_seconds": fit_seconds,
        "budget": {"max_steps": cfg.trainer.get("max_steps"), "max_time": cfg.trainer.get("max_time")},
        # None when no validation ran (trainer.limit_val_batches=0, or too few steps): not measured.
        "teacher_perplexity": metrics.get("val/ppl_teacher"),
        "student_perplexity": metrics.get("val/ppl_student"),
        "teacher_dense_parameters": teacher_params,
        "student_dense_parameters": student_params,
        "dense_parameter_fraction": student_params / teacher_params,
        "trainable_parameters": trainable_parameters(student),
        "teacher_blocks": len(family_of(base.config).blocks(base)),
        "swapped_layers": {str(i): layer.cfg.type for i, layer in swapped.items()},
        "swapped_layer_parameters": sum(count_parameters(layer) for layer in swapped.values()),
        "memory_entries": memory_entries(student),
        "arithmetic": swap_arithmetic(swapped, mlp_form(student.config)),
        "export_dir": None,
        "world_size": trainer.world_size,
        "memory_digests": digests,
    }
    if not trainer.is_global_zero:
        return summary
    if cfg.get("export"):
        summary["export_dir"] = str(save_pretrained(student, tokenizer, output_dir / "export"))
    if cfg.evaluate.enabled:
        summary["evaluation"], summary["heldout_evaluation"] = evaluate_on_held_out(
            cfg, base, student, tokenizer, datamodule, output_dir
        )
    summary["wall_seconds"] = time.monotonic() - started
    summary["not_measured"] = {
        key: "no validation ran during training"
        for key in ("teacher_perplexity", "student_perplexity")
        if summary[key] is None
    }
    write_json(output_dir / "summary.json", summary)
    print_summary(summary)
    return summary


def evaluate_on_held_out(
    cfg: DictConfig, teacher: Any, student: Any, tokenizer: Any, datamodule: Any, output_dir: Path
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Sliding-window perplexity of teacher, student and (``evaluate.ablated``) ablated teacher on the
    validation documents (``eval.json``) and on each held-out source of the data (``data=broad``:
    ``eval_heldout.json``).

    Returns ``({row: perplexity} on the validation documents, {source: {row: perplexity}})``.
    """
    settings = cfg.evaluate
    sets = {"validation": datamodule.val_texts()}
    heldout = datamodule.heldout_texts() if hasattr(datamodule, "heldout_texts") else {}
    results: dict[str, Any] = {}
    for name, texts in {**sets, **heldout}.items():
        results[name] = evaluate(
            teacher,
            tokenizer,
            truncate_texts(texts, tokenizer, settings.max_tokens_per_text),
            student=student.eval(),
            ablate_layers=sorted(swapped_layers(student)) if settings.ablated else None,
            window=settings.window,
            stride=settings.stride,
            batch_size=settings.batch_size,
            cache_dir=settings.cache_dir,
            teacher_id=json.dumps(OmegaConf.to_container(cfg.teacher, resolve=True), sort_keys=True),
            generation_prompts=list(settings.prompts or []) if name == "validation" else [],
            max_new_tokens=settings.max_new_tokens,
        )
        print(f"{name}:\n{format_table(results[name])}")
    validation = results.pop("validation")
    write_json(output_dir / "eval.json", validation)
    if results:
        write_json(output_dir / "eval_heldout.json", results)
    if validation["generations"]:
        print(format_generations(validation))

    def perplexities(result: dict[str, Any]) -> dict[str, float]:
        return {row["name"]: row["perplexity"] for row in result["rows"]}

    return perplexities(validation), {name: perplexities(result) for name, result in results.items()}


def print_summary(summary: dict[str, Any]) -> None:
    ratio = summary["dense_parameter_fraction"]
    types = sorted(set(summary["swapped_layers"].values()))
    lines = [
        "── summary " + "─" * 50,
        f"steps                  {summary['steps']} ({summary['tokens_seen']:,} tokens, "
        f"{summary['fit_seconds'] / 60:.1f} min training)",
        f"teacher perplexity     {measured(summary['teacher_perplexity'])} (validation during training)",
        f"student perplexity     {measured(summary['student_perplexity'])}",
        f"dense parameters       {summary['student_dense_parameters']:,} ({ratio:.1%} of the teacher's)",
        f"swapped layers         {len(summary['swapped_layers'])} ({', '.join(types) or 'none'}), "
        f"{summary['swapped_layer_parameters']:,} parameters",
        f"trainable parameters   {summary['trainable_parameters']:,}",
        f"memory entries         {summary['memory_entries']:,}",
        f"multiply-adds / token  {arithmetic_line(summary['arithmetic'])}",
        f"export                 {summary['export_dir']}",
    ]
    for name, value in summary.get("evaluation", {}).items():
        lines.append(f"held-out ppl {name:<10} {value:.2f}")
    for source, rows in summary.get("heldout_evaluation", {}).items():
        lines.append(f"{source} ppl " + ", ".join(f"{name} {value:.2f}" for name, value in rows.items()))
    print("\n".join(lines))


def measured(value: float | None) -> str:
    """A perplexity for the printed summary, or what stands in its place when none was measured."""
    return "not measured (no validation ran)" if value is None else f"{value:.2f}"


def arithmetic_line(arithmetic: dict[str, Any]) -> str:
    """The swapped layers' multiply-adds per token beside the replaced MLPs', for the printed summary."""
    if arithmetic["mlp_fraction"] is None:
        return "no swapped layers"
    estimate = " (hnsw search estimated)" if arithmetic["search_estimated"] else ""
    return (
        f"{arithmetic['total']:,} in the swapped layers, {arithmetic['mlp_fraction']:.2f}x the replaced "
        f"MLPs' {arithmetic['mlp']:,}{estimate}"
    )
