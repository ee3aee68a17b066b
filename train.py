"""Train a discrete-memory model with the plain language-model loss (no teacher).

python train.py memory=associative trainer.max_steps=500
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import dmt.config  # noqa: F401  (registers the ${pkg:...} resolver)
from dmt.distill.run import distill


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return distill(cfg)["student_perplexity"]


if __name__ == "__main__":
    main()
