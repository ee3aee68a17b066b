"""The Hydra apps ``dmt-distill`` and ``dmt-train`` (also ``python distill.py`` / ``python train.py``).

dmt-distill experiment=quickstart
dmt-distill swap=associative swap.capacity=200000 trainer.max_steps=500
dmt-distill --multirun swap.topk=8,32
dmt-train swap=associative trainer.max_steps=500     # plain language-model loss, no teacher

Both compose ``conf/`` (``distill.yaml`` / ``train.yaml``) from the installed package, so they work from
any directory; runs write under ``outputs/`` of the current directory (``conf/hydra/default.yaml``).
A mistake in a setting or a file ends with one line naming it (:mod:`dmt.cli`).
"""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig

from dmt.cli import run_hydra_task
from dmt.conf import CONFIG_PATH


def run_and_score(cfg: DictConfig) -> float:
    """Run ``dmt.distill.run.distill`` on a composed config; the student's perplexity, for sweepers
    (NaN when no validation ran)."""
    # Imported here, not at the top, so that --help and --cfg answer without loading torch and transformers.
    from dmt.distill.run import distill

    score = distill(cfg)["student_perplexity"]
    return math.nan if score is None else score


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="distill")
def distill_main(cfg: DictConfig) -> float:
    """``dmt-distill``: distil the teacher into a student with kNN memory layers."""
    return run_hydra_task(run_and_score, cfg, "dmt.distill", "dmt-distill")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_main(cfg: DictConfig) -> float:
    """``dmt-train``: train the student with the plain language-model loss (the teacher only seeds it)."""
    return run_hydra_task(run_and_score, cfg, "dmt.distill", "dmt-train")
