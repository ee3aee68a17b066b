"""Callbacks: per-layer memory statistics for the loggers."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl

from dmt.memory import MemoryStats


class MemoryMonitor(pl.Callback):
    """Logs ``memory/layer_XX/<stat>`` for every memory layer every ``every_n_steps`` optimiser steps.

    - ``entries``, and the cumulative ``inserts``, ``evictions`` and ``merges`` since the store was made;
    - per-step rates over the steps since the last log: ``inserts_per_step``, ``evictions_per_step``,
      ``merges_per_step``, ``reads_per_step`` (neighbours returned to training searches),
      ``distinct_reads_per_step`` (distinct entries among them) and ``new_read_share`` (the share of reads
      served by entries inserted during this run);
    - ``mean_topk_distance`` of the latest search;
    - every ``recall_every_n_steps`` steps (0: never), ``recall_at_k``: the share of the exact top-k that
      the key index returns for a sample of the latest training queries (1 for exact indexes).
    """

    def __init__(self, every_n_steps: int = 1, recall_every_n_steps: int = 0) -> None:
        if every_n_steps < 1 or recall_every_n_steps < 0:
            raise ValueError(
                "callbacks.memory_monitor: every_n_steps must be >= 1 and recall_every_n_steps >= 0, got "
                f"{every_n_steps} and {recall_every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.recall_every_n_steps = recall_every_n_steps
        self._last: dict[int, tuple[int, MemoryStats]] = {}  # block → (step, store counters) at last log

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        for index, layer in module.memory_layers.items():
            layer.run_start = layer.store.now
            layer.take_read_counts()  # start the rates from this run
            self._last[index] = (trainer.global_step, layer.store.stats)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        for index, layer in module.memory_layers.items():
            metrics = layer.memory_stats()
            last_step, last = self._last.get(index, (0, MemoryStats()))
            stats = layer.store.stats
            steps = max(1, step - last_step)
            reads = layer.take_read_counts()
            metrics |= {
                "inserts_per_step": (stats.inserts - last.inserts) / steps,
                "evictions_per_step": (stats.evictions - last.evictions) / steps,
                "merges_per_step": (stats.merges - last.merges) / steps,
                "reads_per_step": reads.reads / steps,
                "distinct_reads_per_step": reads.distinct / steps,
                "new_read_share": reads.new / reads.reads if reads.reads else math.nan,
            }
            if self.recall_every_n_steps and step % self.recall_every_n_steps == 0:
                metrics["recall_at_k"] = layer.sample_recall()
            self._last[index] = (step, stats)
            for name, value in metrics.items():
                if not math.isnan(value):  # e.g. no read yet: nothing to log
                    module.log(f"memory/layer_{index:02d}/{name}", float(value), on_step=True, on_epoch=False)
