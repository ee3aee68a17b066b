"""LightningModule that trains a memory student, by distillation from a frozen teacher or by plain LM loss."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from torch import nn
from transformers import PreTrainedModel

from dmt.distill.losses import DIVERGENCES, ce_loss, distillation_divergence, hidden_mse
from dmt.layers import AssociativeMemory
from dmt.model.checkpoint import (
    checkpoint_entry,
    current_entry,
    memory_digest,
    restore_memory_state,
)
from dmt.model.families import get_mlp
from dmt.model.surgery import memory_protocol, swapped_layers


@dataclass(frozen=True)
class FrozenTeacher:
    """Holds the teacher beside the module, outside its module tree: a plain attribute holding a module
    would register it, putting its weights into checkpoints, the optimiser's view and ``.to()`` calls."""

    model: PreTrainedModel | None


@contextmanager
def capture_outputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output of each module during the forward passes inside the block."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, index=index: outputs.__setitem__(index, out))
        for index, module in modules.items()
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def warmup_cosine(
    step: int, warmup_steps: int, max_steps: int | None, min_ratio: float, time_fraction: float = 0.0
) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio``.

    The decay follows whichever budget is further spent: the steps after warm-up (``max_steps``; ``None``
    for no step budget) or ``time_fraction``, the share of a time budget used so far, so a run stopped by
    ``trainer.max_time`` still ends annealed.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = time_fraction
    if max_steps is not None:
        progress = max(progress, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    progress = min(1.0, progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def time_budget_fraction(timer: Timer | None) -> float:
    """Share of ``trainer.max_time`` spent training so far (0 without a time budget)."""
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        return 0.0
    elapsed = timer.time_elapsed()
    total = elapsed + remaining
    return min(1.0, elapsed / total) if total > 0 else 1.0


class DistillationModule(pl.LightningModule):
    """Loss ``α_kd · D(teacher, student)·T² + α_ce · CE + α_hidden · Σ_layers MSE(student, teacher)``.

    ``D`` is the ``divergence`` between the softened distributions: ``forward_kl``, ``KL(teacher ‖ student)``;
    ``reverse_kl``, ``KL(student ‖ teacher)``; or ``jsd``, the generalised Jensen–Shannon divergence with
    the teacher weighted ``jsd_beta`` in the mixture (``dmt.distill.losses.jsd_loss``). Whichever it is,
    it is logged as ``train/kd``.

    With ``teacher=None`` only the CE term is used (plain language-model training, ``train.py``). The
    teacher is frozen, runs under ``no_grad`` and is deliberately not a submodule, so it stays out of
    checkpoints and the optimiser. The memory stores live outside ``state_dict``; checkpoints carry them
    under ``checkpoint["dmt"]`` so weights and memory always come from the same step.

    The swapped layers (memory layers, or the dense baselines of ``dmt.layers.baselines``) are treated
    alike: the hidden loss compares their outputs with the teacher MLPs', ``trainable="memory"`` trains
    only them, and their parameters form the ``memory`` optimiser group (``memory_lr``). Store writes and
    statistics concern the memory layers only.
    """

    @property
    def teacher(self) -> PreTrainedModel | None:
        """The frozen teacher, or ``None`` (plain language-model training)."""
        return self._teacher.model

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None = None,
        *,
        alpha_kd: float = 1.0,
        alpha_ce: float = 0.0,
        alpha_hidden: float = 0.0,
        temperature: float = 2.0,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        lr: float = 3e-4,
        memory_lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        trainable: str = "all",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if trainable not in ("all", "memory"):
            raise ValueError(f"distill.trainable: expected all or memory, got {trainable!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"distill.divergence: expected one of {', '.join(DIVERGENCES)}, got {divergence!r}"
            )
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"distill.jsd_beta: must be in [0, 1], got {jsd_beta}")
        if teacher is None and alpha_ce <= 0:
            raise ValueError("distill.alpha_ce must be > 0 when there is no teacher")
        # run_config: the composed Hydra config, kept so `dmt.export` can rebuild tokenizer and model.
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.student = student
        self._teacher = FrozenTeacher(teacher)  # not a submodule: see class docstring
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # Plain dicts, not ModuleDicts: the layers are already registered inside the student.
        self.swapped_layers = swapped_layers(student)
        # How the training loop talks to the memory layers: their writes, deferred during fit and
        # committed after each optimiser step, and what each forward hands them.
        self.memory = memory_protocol(student)
        self.memory_layers = self.memory.layers
        if trainable == "memory":
            student.requires_grad_(False)
            for layer in self.swapped_layers.values():
                layer.requires_grad_(True)
        for layer in self.memory_layers.values():
            if isinstance(layer, AssociativeMemory) and layer.mlp is not None:
                # A kept MLP (swap.output.keep_mlp) stays the teacher's: the memory learns what to add to it.
                layer.mlp.requires_grad_(False)
        # Training tokens this process has fed the student (restored on resume; summed over ranks by
        # the run summary).
        self.tokens_seen = 0
        # Summed validation NLL and scored tokens of this epoch; the frozen teacher's NLL per token is
        # computed in the first real validation and reused afterwards.
        self._val_sums = torch.zeros(2, dtype=torch.float64)
        self._teacher_val_sums = torch.zeros(2, dtype=torch.float64)
        self._teacher_val_nll: float | None = None

    # ---- forward and losses -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        layers = self.swapped_layers
        teacher = self.teacher if hp.alpha_kd > 0 or hp.alpha_hidden > 0 else None
        teacher_out: dict[int, torch.Tensor] = {}
        if teacher is not None:  # first, so that its MLP outputs can be inserted (distillation by insertion)
            teacher_mlps = {i: get_mlp(teacher, i) for i in layers}
            with torch.no_grad(), capture_outputs(teacher_mlps) as teacher_out:
                teacher_logits = teacher(input_ids=input_ids, attention_mask=mask).logits
        with capture_outputs(layers) as student_out, self.memory.forward(input_ids, teacher_out):
            logits = self(input_ids, mask)
        out = {"ce": ce_loss(logits, input_ids, mask)}
        if teacher is not None:
            out["kd"] = distillation_divergence(
                hp.divergence, logits, teacher_logits, mask, hp.temperature, hp.jsd_beta
            )
            if layers:
                out["hidden"] = torch.stack(
                    [hidden_mse(student_out[i], teacher_out[i], mask) for i in layers]
                ).mean()
        out["loss"] = (
            hp.alpha_ce * out["ce"]
            + hp.alpha_kd * out.get("kd", torch.zeros(()))
            + hp.alpha_hidden * out.get("hidden", torch.zeros(()))
        )
        return out

    # ---- Lightning hooks ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.memory.deferred = True

    def on_fit_end(self) -> None:
        self.memory.commit()
        self.memory.deferred = False

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Weights and memory advance together: a checkpoint taken after this step holds both.
        self.memory.commit()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        if not torch.isfinite(out["loss"]):
            parts = {k: float(v) for k, v in out.items()}
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} ({parts}); stopping before the "
                "optimiser step writes it into the weights and the memory"
            )
        batch_size = batch["input_ids"].shape[0]
        self.tokens_seen += int(batch["attention_mask"].sum())
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch_size)
        for name in ("kd", "ce", "hidden"):
            if name in out:
                self.log(f"train/{name}", out[name], batch_size=batch_size)
        return out["loss"]

    def on_after_backward(self) -> None:
        # Stored values learn by sparse SGD from the gradient of the returned values.
        self.memory.write_back_values(self.trainer.world_size)

    def on_validation_epoch_start(self) -> None:
        self._val_sums.zero_()
        self._teacher_val_sums.zero_()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        tokens = float((mask[:, 1:] * mask[:, :-1]).sum())  # scored next-token pairs

        def nll_sums(logits: torch.Tensor) -> torch.Tensor:
            return torch.tensor(
                [float(ce_loss(logits, input_ids, mask)) * tokens, tokens], dtype=torch.float64
            )

        with self.memory.forward():
            self._val_sums += nll_sums(self(input_ids, mask))
        if self.teacher is not None and self._teacher_val_nll is None:
            with torch.no_grad():
                self._teacher_val_sums += nll_sums(
                    self.teacher(input_ids=input_ids, attention_mask=mask).logits
                )

    def on_validation_batch_end(self, *args: Any) -> None:
        self.memory.commit()  # references (and inserts, with insert_during_eval)

    def on_validation_epoch_end(self) -> None:
        # Sum over data-parallel ranks, so every rank logs the perplexity of the whole validation split.
        val_sums = self.trainer.strategy.reduce(self._val_sums.to(self.device), reduce_op="sum").cpu()
        teacher_sums = self.trainer.strategy.reduce(
            self._teacher_val_sums.to(self.device), reduce_op="sum"
        ).cpu()
        if val_sums[1] == 0:
            return
        nll = float(val_sums[0] / val_sums[1])
        self.log("val/loss", nll, prog_bar=True)
        self.log("val/ppl_student", math.exp(min(nll, 50.0)), prog_bar=True)
        if self.teacher is not None:
            teacher_nll = self._teacher_val_nll
            if teacher_nll is None:
                teacher_nll = float(teacher_sums[0] / teacher_sums[1])
                if not self.trainer.sanity_checking:  # the sanity check sees only part of the split
                    self._teacher_val_nll = teacher_nll
            self.log("val/ppl_teacher", math.exp(min(teacher_nll, 50.0)))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        memory_params = {id(p) for layer in self.swapped_layers.values() for p in layer.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "memory": []}
        for name, param in self.student.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in memory_params:
                groups["memory"].append(param)
            elif param.ndim < 2 or "norm" in name or "ln_" in name:
                groups["no_decay"].append(param)
            else:
                groups["decay"].append(param)
        param_groups = [
            {"name": "dense", "params": groups["decay"], "lr": hp.lr, "weight_decay": hp.weight_decay},
            {"name": "dense_no_decay", "params": groups["no_decay"], "lr": hp.lr, "weight_decay": 0.0},
            {"name": "memory", "params": groups["memory"], "lr": hp.memory_lr, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]], betas=tuple(hp.betas))
        max_steps = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        step_budget = int(max_steps) if math.isfinite(max_steps) else None  # None: only max_time bounds
        # Lightning adds a Timer callback when trainer.max_time is set.
        timer = next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, hp.warmup_steps, step_budget, hp.min_lr_ratio, time_budget_fraction(timer)
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Writes are committed right after each optimiser step and validation batch, so the stores here
        # belong to the same step as the weights; an unfinished step's writes are left out, as its update is.
        checkpoint["dmt"] = checkpoint_entry(
            self.student, global_step=self.global_step, tokens_seen=self.tokens_seen
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["dmt"] = current_entry(checkpoint["dmt"], "checkpoint")
        self.tokens_seen = int(state.get("tokens_seen", 0))
        restore_memory_state(self.student, state["memory_state"])
        if memory_digest(self.student) != state["memory_digest"]:
            raise ValueError(
                "checkpoint memory does not match the digest saved with it (corrupt or edited checkpoint)"
            )
        if state["global_step"] != checkpoint.get("global_step", state["global_step"]):
            steps = state["global_step"], checkpoint["global_step"]
            raise ValueError(f"checkpoint memory is from step {steps[0]}, its weights from step {steps[1]}")
