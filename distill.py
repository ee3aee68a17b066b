"""Distil a causal LM into a student with kNN memory layers.

python distill.py                                   # the embedded default (see README)
python distill.py memory=associative memory.capacity=200000 trainer.max_steps=500
python distill.py --multirun memory.topk=8,32
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import dmt.config  # noqa: F401  (registers the ${pkg:...} resolver)
from dmt.distill.run import distill


@hydra.main(version_base="1.3", config_path="conf", config_name="distill")
def main(cfg: DictConfig) -> float:
    summary = distill(cfg)
    # Returned for Hydra sweepers that optimise a metric.
    return summary["student_perplexity"]


if __name__ == "__main__":
    main()
