import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_student, write_checkpoint
from torch.testing import assert_close

from dmt.distill.module import DistillationModule
from dmt.errors import InputFileError
from dmt.memory import KNNStore
from dmt.model.checkpoint import (
    memory_digest,
    memory_state,
    restore_memory_state,
    state_digest,
    student_from_checkpoint,
)
from dmt.model.families import get_mlp
from dmt.model.persistence import load_pretrained, load_student, save_pretrained
from dmt.model.surgery import (
    build_student,
    memory_layers,
    memory_protocol,
    resolve_layer_configs,
    swapped_layers,
)

TOKENS = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))


def trained_student(teacher):
    student = tiny_student(teacher, TOKENS)
    for layer in memory_layers(student).values():
        assert len(layer.store) > 0
    return student


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("mmap", [False, True])
def test_export_then_load_reproduces_logits_and_generates(fixture, mmap, request, tmp_path, gpt2_tokenizer):
    student = trained_student(request.getfixturevalue(fixture))
    with torch.no_grad():
        expected = student(TOKENS).logits
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    loaded, tokenizer = load_pretrained(tmp_path / "export", mmap=mmap)
    with torch.no_grad():
        assert_close(loaded(TOKENS).logits, expected)
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    generated = loaded.generate(
        **prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape == (1, prompt.input_ids.shape[1] + 5)


def test_training_a_memory_mapped_export_leaves_its_files_as_they_were(tiny_gpt2, tmp_path, gpt2_tokenizer):
    """Value updates of a student loaded with mmap=True land in the mapped pages but stay in memory: every
    file of the export keeps its bytes and its stores verify."""
    save_pretrained(trained_student(tiny_gpt2), gpt2_tokenizer, tmp_path / "export")
    files = {path: path.read_bytes() for path in (tmp_path / "export").rglob("*") if path.is_file()}
    loaded, _ = load_pretrained(tmp_path / "export", mmap=True)
    layers = memory_layers(loaded)
    for layer in layers.values():  # updates only: an insert past the saved rows moves a store into memory
        layer.cfg = replace(layer.cfg, novelty_threshold=None)
    before = {index: layer.store.state().values.copy() for index, layer in layers.items()}
    loaded.train()
    protocol = memory_protocol(loaded)
    with protocol.forward(TOKENS):
        loaded(TOKENS, labels=TOKENS).loss.backward()
    protocol.write_back_values()
    protocol.commit()
    for index, layer in layers.items():
        values = layer.store.state().values
        assert isinstance(values, np.memmap) and not np.array_equal(values, before[index])
    assert {path: path.read_bytes() for path in files} == files
    for index in layers:
        KNNStore.load(tmp_path / "export" / "memory" / f"layer_{index:02d}", verify=True)


def test_export_overwrites_atomically(tiny_gpt2, tmp_path, gpt2_tokenizer):
    student = trained_student(tiny_gpt2)
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_pretrained(tmp_path)


def test_export_of_another_format_is_refused_naming_it(tiny_gpt2, tmp_path, gpt2_tokenizer):
    save_pretrained(trained_student(tiny_gpt2), gpt2_tokenizer, tmp_path / "export")
    config_path = tmp_path / "export" / "config.json"
    config = json.loads(config_path.read_text())
    config["dmt"]["format_version"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputFileError, match=r"config\.json: export format 3 .*again with dmt-export"):
        load_pretrained(tmp_path / "export")


def test_checkpoint_of_another_format_is_refused_naming_it(tiny_gpt2, tmp_path):
    """One version covers a checkpoint's whole dmt entry, the stores' states included."""
    path = tmp_path / "old.ckpt"
    write_checkpoint(trained_student(tiny_gpt2), path)
    checkpoint = torch.load(path, weights_only=True)
    assert "format_version" not in checkpoint["dmt"]["memory_state"]["0"]
    checkpoint["dmt"]["format_version"] = 2
    torch.save(checkpoint, path)
    with pytest.raises(
        InputFileError,
        match=rf"{path}: dmt checkpoint format 2 is not the one this dmt reads \(3, or the one before it\)",
    ):
        load_student(path)


def test_a_checkpoint_of_the_previous_layout_still_loads_and_resumes(tiny_gpt2, tmp_path):
    """The layout before the single version (layer settings under a versioned memory_spec with every
    backend's index settings, versioned store states) is read as it was written."""
    student = trained_student(tiny_gpt2)
    path = tmp_path / "previous.ckpt"
    write_checkpoint(student, path)
    checkpoint = torch.load(path, weights_only=True)
    entry = checkpoint["dmt"]
    states = {index: {**state, "format_version": 3} for index, state in entry.pop("memory_state").items()}
    layers = {
        index: {**cfg, "index": {**cfg["index"], "cells_per_half": None, "probe_cells": None}}
        for index, cfg in entry.pop("layers").items()
    }
    del entry["format_version"]
    entry |= {"memory_spec": {"format_version": 2, "layers": layers}, "memory_state": states}
    entry |= {"memory_digest": state_digest(states), "global_step": 0}  # as Lightning's own entries
    torch.save(checkpoint, path)
    loaded, _ = load_student(path)
    with torch.no_grad():
        assert_close(loaded(TOKENS).logits, student(TOKENS).logits)
    module = DistillationModule(trained_student(tiny_gpt2), None, alpha_ce=1.0)
    resumed = torch.load(path, weights_only=True)
    module.on_load_checkpoint(resumed)  # resume: the memory checked against the converted digest
    assert resumed["dmt"]["format_version"] == 3
    assert memory_digest(module.student) == resumed["dmt"]["memory_digest"] != state_digest(states)
    entry["memory_digest"] = "0" * 64
    torch.save(checkpoint, path)
    with pytest.raises(InputFileError, match="the memory does not match the digest saved with it"):
        load_student(path)


def test_checkpoint_memory_state_round_trip(tiny_gpt2, tmp_path):
    student = trained_student(tiny_gpt2)
    path = tmp_path / "memory.pt"
    torch.save(memory_state(student), path)
    with torch.no_grad():
        expected = student(TOKENS).logits
    fresh = trained_student(tiny_gpt2)
    fresh.load_state_dict(student.state_dict())
    restore_memory_state(fresh, torch.load(path, weights_only=True))
    with torch.no_grad():
        assert_close(fresh(TOKENS).logits, expected)


def baseline_student(teacher):
    """Memory (featural, filled), low-rank (warm-started) and removed layers side by side, trained a step
    so that no weight is still what a fresh build would give."""
    configs = resolve_layer_configs(
        {
            "blocks": [0, 1, 3],
            "type": ["featural", "lowrank", "removed"],
            "capacity": 256,
            "topk": 4,
            "key_dim": 8,
            "novelty_threshold": 0.0,
            "init": "empty",
            "per_block": {1: {"init": "ffn"}},
        },
        teacher.config,
    )
    student = build_student(teacher, configs)
    student(TOKENS, labels=TOKENS).loss.backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    return student.eval()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_baselines_survive_export_and_checkpoint(fixture, request, tmp_path, gpt2_tokenizer):
    student = baseline_student(request.getfixturevalue(fixture))
    with torch.no_grad():
        expected = student(TOKENS).logits
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    spec = json.loads((tmp_path / "export" / "config.json").read_text())["dmt"]
    assert {i: layer["type"] for i, layer in spec["layers"].items()} == {
        "0": "featural",
        "1": "lowrank",
        "3": "removed",
    }
    assert spec["layers"]["1"]["rank"] == get_mlp(student, 1).width  # the width chosen is saved
    assert sorted(p.name for p in (tmp_path / "export" / "memory").iterdir()) == ["layer_00"]
    loaded, _ = load_pretrained(tmp_path / "export")
    # A Lightning checkpoint as DistillationModule writes it.
    module = DistillationModule(student, alpha_ce=1.0)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    from_ckpt = student_from_checkpoint(checkpoint)
    for model in (loaded, from_ckpt):
        assert {i: type(m) for i, m in swapped_layers(model).items()} == {
            i: type(m) for i, m in swapped_layers(student).items()
        }
        with torch.no_grad():
            assert_close(model(TOKENS).logits, expected)


def test_dense_weight_free_magnitude_ranked_memory_survives_export(tiny_llama, tmp_path, gpt2_tokenizer):
    c, units = tiny_llama.config.hidden_size, tiny_llama.config.intermediate_size
    settings = {"blocks": "all", "init": "ffn", "key_dim": c + 1, "gate_dim": c, "weighting": "silu"}
    settings |= {"metric": "ip", "topk": 8, "capacity": units, "dense_weights": False, "ranking": "magnitude"}
    student = build_student(tiny_llama, resolve_layer_configs(settings, tiny_llama.config)).train()
    student(TOKENS, labels=TOKENS).loss.backward()
    for layer in memory_layers(student).values():
        layer.apply_value_updates(lr=0.1)  # the stored rows are no longer the teacher's
    student.eval()
    with torch.no_grad():
        expected = student(TOKENS).logits
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    loaded, _ = load_pretrained(tmp_path / "export")
    for layer in memory_layers(loaded).values():
        assert layer.cfg.ranking == "magnitude" and not layer.cfg.dense_weights
    with torch.no_grad():
        assert_close(loaded(TOKENS).logits, expected)
