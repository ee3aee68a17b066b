"""On the real teacher: a few plays memorised into SmolLM2's cache make a held-out play read better."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dmt.config import validate_config
from dmt.data.corpus import head, read_source
from dmt.evaluation.perplexity import perplexity
from dmt.memorize import run_memorize
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import load_pretrained, save_pretrained
from dmt.model.surgery import build_student

MEMORISED = ["othello_gut", "lear_gut", "julius_caesar_gut", "richard_ii_gut"]
HELD_OUT = "hamlet_gut"
CHARS = 40_000


@pytest.mark.slow
def test_a_pack_of_plays_makes_a_held_out_play_read_below_the_teacher(tmp_path):
    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("distill", overrides=["experiment=associative_cache"])
        memorize_cfg = compose("memorize")
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg.teacher)
    tokenizer = load_tokenizer(cfg.teacher)
    student = build_student(load_teacher(cfg.teacher), validate_config(cfg)).eval()
    export = save_pretrained(student, tokenizer, tmp_path / "cache_student")
    plays = {d.name.split("/")[1]: d.text for d in read_source("shakespeare")}
    corpus = tmp_path / "plays"
    corpus.mkdir()
    for name in MEMORISED:
        (corpus / f"{name}.txt").write_text(head(plays[name], CHARS))
    OmegaConf.set_struct(memorize_cfg, False)
    memorize_cfg.merge_with(
        {
            "student": str(export),
            "corpus": [str(corpus)],
            "window": 512,
            "stride": 448,
            "output": str(tmp_path / "plays.pack"),
            "quiet": True,
        }
    )
    summary = run_memorize(memorize_cfg)
    assert summary["documents"] == len(MEMORISED) and summary["entries"]["29"] > 40_000
    with_pack, _ = load_pretrained(export, memory=tmp_path / "plays.pack")
    text = [head(plays[HELD_OUT], 16_000)]
    teacher_ppl = perplexity(teacher, tokenizer, text, 512, 256, 4)["perplexity"]
    student_ppl = perplexity(with_pack, tokenizer, text, 512, 256, 4)["perplexity"]
    assert student_ppl < teacher_ppl, (student_ppl, teacher_ppl)
