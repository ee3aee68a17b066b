"""The Hydra apps ``dmt-distill`` and ``dmt-train`` (also ``python distill.py`` / ``python train.py``).

dmt-distill experiment=quickstart
dmt-distill swap=associative swap.store.capacity=200000 trainer.max_steps=500
dmt-distill --multirun swap.read.topk=8,32
dmt-train swap=associative trainer.max_steps=500     # plain language-model loss, no teacher

Both compose ``conf/`` (``distill.yaml`` / ``train.yaml``) from the installed package, so they work from
any directory; runs write under ``outputs/`` of the current directory (``conf/hydra/default.yaml``).
A mistake in a setting or a file ends with one line naming it (:mod:`dmt.cli`).
"""

from __future__ import annotations

import math
import re
import sys

import hydra
from omegaconf import DictConfig

from dmt.cli import command_name, run_hydra_task, user_errors
from dmt.conf import CONFIG_PATH


def run_and_score(cfg: DictConfig) -> float:
    """Run ``dmt.distill.run.distill`` on a composed config; the student's perplexity, for sweepers
    (NaN when no validation ran)."""
    # Imported here, not at the top, so that --help and --cfg answer without loading torch and transformers.
    from dmt.distill.run import distill

    score = distill(cfg)["student_perplexity"]
    return math.nan if score is None else score


def refuse_flat_swap_overrides(prog: str, argv: list[str]) -> None:
    """End the command, naming the new key, at an override of a ``swap`` setting by its flat key
    (``swap.topk=16``: ``swap.topk: moved to swap.read.topk``). Hydra would refuse it too, as a key not in
    the config, without saying where the setting is now."""
    # Only a key one level under swap can be flat; the layer settings (and torch) load only then.
    keys = [match.group(1) for arg in argv if (match := re.fullmatch(r"[+~]*swap\.(\w+)(=.*)?", arg, re.S))]
    if keys:
        from dmt.layers.swap import swap_settings

        with user_errors(prog):
            swap_settings({key: {} for key in keys})  # refuses a flat or unknown key; groups pass empty


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="distill")
def _distill_app(cfg: DictConfig) -> float:
    return run_hydra_task(run_and_score, cfg, "dmt.distill", "dmt-distill")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train_app(cfg: DictConfig) -> float:
    return run_hydra_task(run_and_score, cfg, "dmt.distill", "dmt-train")


def distill_main() -> None:
    """``dmt-distill``: distil the teacher into a student with kNN memory layers."""
    refuse_flat_swap_overrides(command_name("dmt.distill", "dmt-distill"), sys.argv[1:])
    _distill_app()


def train_main() -> None:
    """``dmt-train``: train the student with the plain language-model loss (the teacher only seeds it)."""
    refuse_flat_swap_overrides(command_name("dmt.distill", "dmt-train"), sys.argv[1:])
    _train_app()
