"""``dmt-eval`` / ``python -m dmt.evaluation [overrides]``: evaluate a student (see ``dmt/conf/eval.yaml``).

python -m dmt.evaluation student=outputs/distill/runs/<run>/export
python -m dmt.evaluation student=outputs/distill/runs/<run>/checkpoints/last.ckpt texts=[my.txt] window=256
python -m dmt.evaluation teacher=tiny_gpt2 ablate_layers=[1,2]      # teacher vs ablated teacher only
"""

from __future__ import annotations

import json
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmt.conf import CONFIG_PATH  # (importing dmt.conf registers the ${pkg:...} resolver)
from dmt.data.datamodule import resolve_files
from dmt.evaluation.evaluate import evaluate, format_generations, format_table, write_json
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import load_student
from dmt.model.surgery import swapped_layers


def eval_texts(cfg: DictConfig, tokenizer: Any) -> list[str]:
    """``cfg.texts`` read as documents, or the data config's validation documents."""
    if cfg.texts is None:
        return instantiate(cfg.data, tokenizer=tokenizer).val_texts()
    paths = [cfg.texts] if isinstance(cfg.texts, str) else list(cfg.texts)
    files = resolve_files(paths, cfg.texts_glob)
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """The whole evaluation from a composed ``eval`` config; prints the table, writes ``cfg.output``."""
    tokenizer = load_tokenizer(cfg.teacher)
    texts = eval_texts(cfg, tokenizer)
    teacher = load_teacher(cfg.teacher)
    student = load_student(cfg.student)[0] if cfg.student is not None else None
    ablate = cfg.ablate_layers
    if ablate is None:
        ablate = sorted(swapped_layers(student)) if student is not None else []
    teacher_cfg = OmegaConf.to_container(cfg.teacher, resolve=True)
    result = evaluate(
        teacher,
        tokenizer,
        texts,
        student=student,
        ablate_layers=list(ablate),
        window=cfg.window,
        stride=cfg.stride,
        batch_size=cfg.batch_size,
        cache_dir=cfg.cache_dir,
        # The resolved teacher config identifies its weights (hub id / file / random-init seed).
        teacher_id=json.dumps(teacher_cfg, sort_keys=True),
        generation_prompts=list(cfg.prompts or []),
        max_new_tokens=cfg.max_new_tokens,
    )
    result["student"] = None if cfg.student is None else str(cfg.student)
    result["teacher"] = teacher_cfg
    print(format_table(result))
    if result["generations"]:
        print("\n" + format_generations(result))
    if cfg.output:
        write_json(cfg.output, result)
        print(f"\nwritten: {cfg.output}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
