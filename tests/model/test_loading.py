import pytest
import torch
from omegaconf import OmegaConf
from torch.testing import assert_close

from dmt.model.loading import load_teacher, load_tokenizer, package_path, teacher_config


def test_local_directory_teacher_loads_like_the_hub_path(tiny_gpt2, gpt2_tokenizer, tmp_path):
    # `teacher=gpt2` and `teacher=local` share this code path: from_pretrained on an id or a directory.
    tiny_gpt2.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    cfg = OmegaConf.create({"name_or_path": str(tmp_path), "gguf_file": None, "tokenizer": None})
    teacher = load_teacher(cfg)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    tokens = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert_close(teacher(tokens).logits, tiny_gpt2(tokens).logits)
    assert teacher_config(cfg).n_layer == tiny_gpt2.config.n_layer
    tokenizer = load_tokenizer(cfg)
    assert tokenizer("Hello world").input_ids == [15496, 995]  # GPT-2's own ids
    assert tokenizer.pad_token == tokenizer.eos_token


def test_missing_package_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_dmt_package"):
        package_path("no_such_dmt_package")
