"""Callbacks: what the memory layers do (and cost) during training, written to the run's loggers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import DeviceStatsMonitor, LearningRateMonitor
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from dmt.layers.arithmetic import swap_arithmetic
from dmt.layers.base import MemoryLayer
from dmt.memory import MemoryStats
from dmt.model.families import mlp_form


class MemoryMonitor(pl.Callback):
    """Logs ``memory/layer_XX/<stat>`` for every memory layer at the trainer's ``log_every_n_steps``.

    Scalars, over the optimiser steps since the previous log (the *interval*):

    - ``entries``: live entries now (a level);
    - ``inserts_per_step``, ``evictions_per_step``, ``merges_per_step``: what the store did per step;
    - ``reads_per_step``: neighbours the training searches returned per step (all micro-batches of a step);
    - ``distinct_share``: distinct entries one training search returned, averaged over the interval's
      searches, over ``entries``: the share of the memory one forward touches. Distinct counts do not add
      up across searches, so they are divided by searches, not steps: with gradient accumulation a step
      makes ``accumulate_grad_batches`` searches per layer, and the entries the whole step touched lie
      between one search's and their sum;
    - ``new_read_share``: the share of reads served by entries inserted during this run;
    - ``mean_topk_distance``: the mean distance of those reads to their queries;
    - every ``recall_every_n_steps`` steps (0: never), ``recall_at_k``: the share of the exact top-k that
      the key index returns for a sample of the latest training queries (1 for exact indexes).

    Every ``histogram_every_n_steps`` steps (0: never), loggers that draw histograms (an ``.experiment``
    with ``add_histogram``, e.g. TensorBoard) get ``lrfu_score`` (each live entry's LRFU score, which the
    ``lrfu`` eviction takes lowest first: at ``lrfu_lambda`` 0 its reads plus one for its insert; above,
    older references weigh less) and ``read_count`` (each live entry's reads since it was stored).

    The cumulative counters are not logged: they are in the store's ``stats``, and a rate shows a change of
    regime that a growing total hides. Reads are counted per process; under data parallelism the logged
    ones are rank 0's, while inserts, evictions and merges are every rank's (the stores are replicated).
    Recall and histograms are measured at a logging step, the first one at or after
    each multiple of their interval (exactly every n steps when n is a multiple of ``log_every_n_steps``).

    Every swapped layer (memory layer or baseline) also gets its arithmetic (:mod:`dmt.layers.arithmetic`):
    ``arithmetic/layer_XX/multiply_adds_per_token`` and ``arithmetic/layer_XX/mlp_fraction`` (over the
    replaced MLP's), and ``arithmetic/mlp_fraction`` for all swapped layers over all replaced MLPs. They are
    logged at train start, at the index of the step to come, and again at a logging step when they changed:
    a memory layer's search and read grow with its store until it is full.

    Values go to the loggers directly, at the step axis of ``LightningModule.log`` values (the 0-based
    index of the step just taken, as for ``train/loss``): ``self.log`` would re-send a value that was not
    logged again (``recall_at_k`` between measurements) at every later logging step. Needs a logger.
    """

    def __init__(self, recall_every_n_steps: int = 0, histogram_every_n_steps: int = 0) -> None:
        for name, value in (
            ("recall_every_n_steps", recall_every_n_steps),
            ("histogram_every_n_steps", histogram_every_n_steps),
        ):
            if value < 0:
                raise ValueError(f"callbacks.memory_monitor.{name} must be >= 0, got {value}")
        self.recall_every_n_steps = recall_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self._step_seen = 0  # global step after the latest training batch: tells which batches stepped
        self._logged: dict[int, tuple[int, MemoryStats]] = {}  # block → (step, store counters) at last log
        self._arithmetic_logged: dict[str, float] = {}  # the arithmetic scalars last logged

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use MemoryMonitor callback with Trainer that has no logger."
            )

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # After a checkpoint is restored: the rates start from the resumed step.
        self._step_seen = trainer.global_step
        for index, layer in module.memory_layers.items():
            layer.start_run()
            layer.take_read_counts()
            self._logged[index] = (trainer.global_step, layer.store.stats)
        self._arithmetic_logged = {}
        self._log_arithmetic_if_changed(trainer, module, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        stepped, self._step_seen = step != self._step_seen, step  # False while accumulating gradients
        interval = trainer.log_every_n_steps
        if not stepped or not interval or step % interval:
            return
        self._log_arithmetic_if_changed(trainer, module, step=step - 1)
        for index, layer in module.memory_layers.items():
            prefix = f"memory/layer_{index:02d}"
            last_step, last = self._logged[index]
            self._logged[index] = (step, layer.store.stats)
            metrics = {
                f"{prefix}/{name}": value for name, value in interval_scalars(layer, step - last_step, last)
            }
            if trainer.is_global_zero:  # only rank 0 writes to the loggers
                if _due(self.recall_every_n_steps, step, last_step):
                    metrics[f"{prefix}/recall_at_k"] = layer.sample_recall()
                if _due(self.histogram_every_n_steps, step, last_step):
                    log_histograms(trainer, prefix, layer)
            metrics = {name: value for name, value in metrics.items() if not math.isnan(value)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)

    def _log_arithmetic_if_changed(self, trainer: pl.Trainer, module: pl.LightningModule, step: int) -> None:
        """Log the swapped layers' arithmetic at ``step`` unless it equals what was logged last."""
        metrics = arithmetic_scalars(swap_arithmetic(module.swapped_layers, mlp_form(module.student.config)))
        if metrics == self._arithmetic_logged:
            return
        self._arithmetic_logged = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def arithmetic_scalars(arithmetic: dict[str, Any]) -> dict[str, float]:
    """``arithmetic/...`` scalars of a :func:`~dmt.layers.arithmetic.swap_arithmetic` result: per block
    its multiply-adds per token and their fraction of the replaced MLP's, and the fraction in total."""
    metrics = {}
    for index, block in arithmetic["blocks"].items():
        prefix = f"arithmetic/layer_{int(index):02d}"
        metrics[f"{prefix}/multiply_adds_per_token"] = float(block["total"])
        metrics[f"{prefix}/mlp_fraction"] = float(block["mlp_fraction"])
    if arithmetic["mlp_fraction"] is not None:
        metrics["arithmetic/mlp_fraction"] = float(arithmetic["mlp_fraction"])
    return metrics


def interval_scalars(layer: MemoryLayer, steps: int, last: MemoryStats) -> list[tuple[str, float]]:
    """One layer's scalars over the last ``steps`` optimiser steps, from its store counters ``last`` at
    their start (NaN where nothing was read); the layer's read counts restart."""
    stats = layer.store.stats
    reads = layer.take_read_counts()
    entries = len(layer.store)
    per_search = reads.distinct / reads.searches if reads.searches else math.nan
    return [
        ("entries", float(entries)),
        ("inserts_per_step", (stats.inserts - last.inserts) / steps),
        ("evictions_per_step", (stats.evictions - last.evictions) / steps),
        ("merges_per_step", (stats.merges - last.merges) / steps),
        ("reads_per_step", reads.reads / steps),
        ("distinct_share", per_search / entries if entries else math.nan),
        ("new_read_share", reads.new / reads.reads if reads.reads else math.nan),
        ("mean_topk_distance", reads.distance_sum / reads.reads if reads.reads else math.nan),
    ]


def _due(every_n_steps: int, step: int, last_step: int) -> bool:
    """Whether a multiple of ``every_n_steps`` (0: never) lies in ``(last_step, step]``."""
    return every_n_steps > 0 and step // every_n_steps > last_step // every_n_steps


def log_histograms(trainer: pl.Trainer, prefix: str, layer: MemoryLayer) -> None:
    """Histograms of the live entries' LRFU scores and read counts, to every logger that draws them."""
    experiments = [
        experiment
        for logger in trainer.loggers
        if hasattr(experiment := getattr(logger, "experiment", None), "add_histogram")
    ]
    store = layer.store
    ids = store.live_ids()  # (L,)
    if not experiments or not len(ids):
        return
    histograms = {"lrfu_score": store.lrfu_scores(ids), "read_count": store.read_counts(ids)}  # (L,) each
    for experiment in experiments:
        for name, values in histograms.items():
            experiment.add_histogram(
                f"{prefix}/{name}", np.asarray(values), global_step=trainer.global_step - 1
            )


# Callbacks that raise without a logger (Lightning's monitors) or only write to one.
LOGGER_BOUND = (LearningRateMonitor, DeviceStatsMonitor, MemoryMonitor)


def needs_logger(callback: pl.Callback) -> bool:
    """Whether ``callback`` is of no use, or fails, in a run without a logger."""
    return isinstance(callback, LOGGER_BOUND)
