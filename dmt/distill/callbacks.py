"""Callbacks: per-layer memory statistics for the loggers."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class MemoryMonitor(pl.Callback):
    """Logs ``memory/layer_XX/{entries,inserts,evictions,merges,mean_topk_distance}`` every few steps."""

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        for index, layer in module.memory_layers.items():
            for name, value in layer.memory_stats().items():
                module.log(f"memory/layer_{index:02d}/{name}", value, on_step=True, on_epoch=False)
