"""Crash safety, resume and data-parallel memory consistency."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmt.distill.checkpoint_io import AtomicCheckpointIO
from dmt.distill.module import DistillationModule
from dmt.layers import AssociativeConfig, AssociativeMemory, FeaturalConfig, FeaturalMemory, MemoryProtocol
from dmt.layers.protocol import apply_writes
from dmt.layers.resolve import resolve
from dmt.model.surgery import build_student, resolve_layer_configs

REPO = Path(__file__).resolve().parents[2]


def run_args(out: Path, text_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "distill.py"),
        "debug=fast",
        f"hydra.run.dir={out}",
        f"data.paths=[{text_dir}]",
        "data.glob=*.txt",
        "swap.blocks=[1,3]",
        "swap.type=[featural,associative]",
        "evaluate.enabled=false",
        *extra,
    ]


@pytest.mark.parametrize("layer_cls", [FeaturalMemory, AssociativeMemory])
def test_replicas_applying_gathered_writes_stay_identical(layer_cls):
    """Two "ranks" see different batches; after applying everyone's writes their stores are identical."""
    config_cls = FeaturalConfig if layer_cls is FeaturalMemory else AssociativeConfig
    cfg = resolve(
        config_cls(
            key_dim=8,
            topk=4,
            capacity=20,  # smaller than one step of inserts from both ranks: eviction runs
            novelty_threshold=0.0,
        ),
        16,
    )
    ranks = []
    for _ in range(2):
        torch.manual_seed(0)
        ranks.append(layer_cls(16, cfg).train())
    protocols = [MemoryProtocol({0: layer}, deferred=True) for layer in ranks]
    for step in range(2):
        writes = []
        for rank, (layer, protocol) in enumerate(zip(ranks, protocols, strict=True)):
            torch.manual_seed(100 * step + rank)  # each rank its own batch
            with protocol.forward():
                layer(torch.randn(2, 8, 16)).pow(2).sum().backward()
            if isinstance(layer, FeaturalMemory):
                protocol.write_back_values()
            if step == 0:
                assert len(layer.store) == 0  # deferred: nothing applied during the step
            writes.append(protocol.take_writes()[0])
        assert {op for op, _ in writes[0]} >= {"reference", "insert"}
        for layer in ranks:
            apply_writes(layer.store, writes)
    a, b = (layer.store.state_dict() for layer in ranks)
    assert len(ranks[0].store) == len(ranks[1].store) == 20
    for key in a:
        assert (a[key] == b[key]).all() if hasattr(a[key], "all") else a[key] == b[key], key


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_kill_at_random_moments_then_resume(tmp_path, text_dir):
    """kill -9 a real run after random delays; each resume loads weights and memory of one step."""
    rng = random.Random(0)
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.ckpt"
    common = ("trainer.max_steps=40", "callbacks.model_checkpoint.every_n_train_steps=2")
    for attempt in range(3):
        resume = (f"ckpt_path={ckpt}",) if ckpt.exists() else ()
        proc = subprocess.Popen(
            run_args(out, text_dir, *common, *resume),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        before = torch.load(ckpt, weights_only=True)["global_step"] if ckpt.exists() else -1
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and torch.load(ckpt, weights_only=True)["global_step"] > before:
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = torch.load(ckpt, weights_only=True)  # never a truncated file
        assert state["dmt"]["global_step"] == state["global_step"], attempt
    # A final resume finishes the run; the checkpoint's memory digest is verified on load, and the next
    # save clears any temporary file a killed save left.
    done = subprocess.run(
        run_args(out, text_dir, *common, f"ckpt_path={ckpt}"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]


def test_two_process_ddp_ends_with_identical_memory(tmp_path, text_dir):
    out = tmp_path / "ddp"
    done = subprocess.run(
        run_args(out, text_dir, "trainer=ddp_cpu", "debug=fast"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["memory_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert summary["memory_entries"] > 0


def test_nan_loss_stops_before_the_memory_is_touched(tiny_gpt2):
    configs = resolve_layer_configs(
        {"blocks": [1], "capacity": 64, "topk": 4, "key_dim": 8, "novelty_threshold": 0.0},
        tiny_gpt2.config,
    )
    student = build_student(tiny_gpt2, configs)
    module = DistillationModule(student, tiny_gpt2, alpha_kd=1.0, alpha_ce=0.5)
    module.on_fit_start()  # writes are deferred to the optimiser step, as in training
    with torch.no_grad():
        student.transformer.ln_f.weight.fill_(float("nan"))  # after the memory layer: a NaN loss only
    batch = {
        "input_ids": torch.randint(0, 1000, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    entries = len(module.memory_layers[1].store)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        module.training_step(batch, 0)
    # The step's inserts were recorded but never committed: the memory is as before the bad step.
    assert any(op == "insert" for op, _ in module.memory.take_writes()[1])
    assert len(module.memory_layers[1].store) == entries


def test_checkpoint_with_tampered_memory_is_rejected(tiny_gpt2):
    configs = resolve_layer_configs(
        {"blocks": [1], "capacity": 64, "topk": 4, "key_dim": 8, "novelty_threshold": 0.0},
        tiny_gpt2.config,
    )
    module = DistillationModule(build_student(tiny_gpt2, configs), tiny_gpt2)
    module.student(torch.randint(0, 1000, (1, 8)))  # fill the store
    checkpoint: dict = {"global_step": 0}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # round trip accepted
    checkpoint["dmt"]["memory_state"]["1"]["values"][0, 0] += 1.0
    with pytest.raises(ValueError, match="digest"):
        module.on_load_checkpoint(checkpoint)
    checkpoint["global_step"] = 5
    with pytest.raises(ValueError, match="step"):
        module.on_save_checkpoint(checkpoint) or module.on_load_checkpoint(checkpoint)


def test_next_save_clears_what_a_killed_save_left(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")  # a writer killed mid-save
    (tmp_path / ".other.ckpt.abc123.tmp").write_bytes(b"not ours to delete")
    io.save_checkpoint({"step": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.abc123.tmp", "last.ckpt"]
