"""``dmt-eval`` / ``python -m dmt.evaluation [overrides]``: evaluate a student (see ``conf/eval.yaml``).

dmt-eval student=outputs/distill/runs/<run>/export
dmt-eval student=outputs/distill/runs/<run>/checkpoints/last.ckpt texts=[my.txt] window=256
dmt-eval teacher=tiny_gpt2 ablate_layers=[1,2]      # teacher vs ablated teacher only
"""

from __future__ import annotations

import json
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmt.cli import run_hydra_task
from dmt.conf import CONFIG_PATH  # (importing dmt.conf registers the configs' resolvers)
from dmt.data.datamodule import resolve_files
from dmt.evaluation.evaluate import evaluate, format_generations, format_table
from dmt.evaluation.perplexity import check_windows
from dmt.files import read_text_file, refuse_existing_file, write_json
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import check_student_path, load_student
from dmt.model.surgery import swapped_layers
from dmt.packs.reading import pack_index
from dmt.progress import set_quiet


def read_texts(cfg: DictConfig) -> list[str] | None:
    """``cfg.texts`` read as documents (each checked to be text), or ``None`` for the data config's."""
    if cfg.texts is None:
        return None
    paths = [cfg.texts] if isinstance(cfg.texts, str) else list(cfg.texts)
    return [read_text_file(path) for path in resolve_files(paths, cfg.texts_glob)]


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """The whole evaluation from a composed ``eval`` config; prints the table, writes ``cfg.output``.

    Everything the user named (output, student, texts, window settings) is checked before a model loads.
    """
    if cfg.get("quiet"):
        set_quiet()
    if cfg.output:
        refuse_existing_file(cfg.output, cfg.get("force", False))
    check_windows(cfg.window, cfg.stride, cfg.batch_size)
    if cfg.student is not None:
        check_student_path(cfg.student)
    texts = read_texts(cfg)
    tokenizer = load_tokenizer(cfg.teacher)
    if texts is None:
        texts = instantiate(cfg.data, tokenizer=tokenizer).val_texts()
    student = None
    if cfg.student is not None:
        student = load_student(
            cfg.student, cfg.get("memory"), pack_index(cfg.get("memory_index")), cfg.get("memory_read")
        )[0]
    teacher = load_teacher(cfg.teacher)
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
        print(f"\nwritten: {write_json(cfg.output, result)}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_hydra_task(run_eval, cfg, "dmt.evaluation", "dmt-eval")


if __name__ == "__main__":
    main()
