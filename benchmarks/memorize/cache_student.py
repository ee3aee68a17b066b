"""Export the untrained cache student of ``experiment=associative_cache``: SmolLM2-135M whole, with the
associative cache beside block 29's MLP as the experiment builds it before any training step; or, with
``--on STUDENT``, that same cache added beside the last block's MLP of a student already made (e.g. one
whose blocks 19-28 are featural memories), the student's own layers left as they are.

python -m benchmarks.memorize.cache_student OUT_DIR [override ...]
python -m benchmarks.memorize.cache_student OUT_DIR --on STUDENT [override ...]
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dmt.config import validate_config
from dmt.layers.swap import swap_settings
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import load_pretrained, save_pretrained
from dmt.model.surgery import attach_memory_layers, build_student, resolve_layer_configs, swapped_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--on", default=None, help="an export to add the cache to (default: the teacher)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of experiment=associative_cache")
    args = parser.parse_intermixed_args()
    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("distill", overrides=["experiment=associative_cache", *args.overrides])
    torch.manual_seed(cfg.seed)
    if args.on is None:
        plan = validate_config(cfg)
        student, tokenizer = build_student(load_teacher(cfg.teacher), plan), load_tokenizer(cfg.teacher)
    else:
        student, tokenizer = load_pretrained(args.on)
        # The cache's shape follows the student it joins (its width and blocks), not the config's teacher.
        swap = OmegaConf.to_container(cfg.swap, resolve=True)
        plan = resolve_layer_configs(swap_settings(swap), student.config)
        taken = sorted(set(plan) & set(swapped_layers(student)))
        if taken:
            parser.error(
                f"--on {args.on}: block(s) {taken} already hold a swapped layer; the cache keeps an MLP"
            )
        attach_memory_layers(student, plan)
    print(save_pretrained(student.eval(), tokenizer, args.out_dir))


if __name__ == "__main__":
    main()
