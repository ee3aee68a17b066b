"""The cache student script adds the cache beside the last block's MLP of a student already made."""

import sys

import pytest
import torch

from benchmarks.memorize import cache_student
from dmt.layers import AssociativeMemory, FeaturalMemory
from dmt.model.persistence import load_pretrained, save_pretrained
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs

TINY = ["swap.read.value_dim=32"]  # the tiny Llama's hidden size


def featural_export(teacher, tokenizer, directory, blocks):
    settings = {"blocks": blocks, "type": "featural", "topk": 4, "capacity": 64}
    return save_pretrained(
        build_student(teacher, resolve_layer_configs(settings, teacher.config)).eval(), tokenizer, directory
    )


def run(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["cache_student", *argv])
    cache_student.main()


def test_the_cache_joins_a_students_own_layers_and_reads_nothing_while_empty(
    tiny_llama, gpt2_tokenizer, tmp_path, monkeypatch
):
    base = featural_export(tiny_llama, gpt2_tokenizer, tmp_path / "base", [1, 2])
    run(monkeypatch, str(tmp_path / "out"), "--on", str(base), *TINY)
    before, _ = load_pretrained(base)
    after, _ = load_pretrained(tmp_path / "out")
    layers = memory_layers(after)
    assert sorted(layers) == [1, 2, 3]
    assert all(isinstance(layers[i], FeaturalMemory) for i in (1, 2))
    assert isinstance(layers[3], AssociativeMemory) and layers[3].cfg.keep_mlp
    tokens = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():  # an empty cache adds nothing: the student reads as it did
        torch.testing.assert_close(after(tokens).logits, before(tokens).logits)


def test_a_block_that_already_holds_a_layer_is_refused(tiny_llama, gpt2_tokenizer, tmp_path, monkeypatch):
    base = featural_export(tiny_llama, gpt2_tokenizer, tmp_path / "base", [3])
    with pytest.raises(SystemExit):
        run(monkeypatch, str(tmp_path / "out"), "--on", str(base), *TINY)
    assert not (tmp_path / "out").exists()
