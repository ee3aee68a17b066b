"""Export the untrained cache student of ``experiment=associative_cache``: SmolLM2-135M whole, with the
associative cache beside block 29's MLP as the experiment builds it before any training step.

python -m benchmarks.memorize.cache_student OUT_DIR [override ...]
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_module

from dmt.config import validate_config
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import save_pretrained
from dmt.model.surgery import build_student


def main(out_dir: str, *overrides: str) -> None:
    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("distill", overrides=["experiment=associative_cache", *overrides])
    torch.manual_seed(cfg.seed)
    student = build_student(load_teacher(cfg.teacher), validate_config(cfg)).eval()
    print(save_pretrained(student, load_tokenizer(cfg.teacher), out_dir))


if __name__ == "__main__":
    main(*sys.argv[1:])
