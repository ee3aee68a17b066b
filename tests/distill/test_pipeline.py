"""The real Hydra config, composed and shrunk, run end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

import dmt.config  # noqa: F401  (resolvers)
import dmt.distill.run as run
from dmt.model.persistence import load_pretrained
from dmt.model.surgery import memory_layers, swapped_layers

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_cfg(*overrides: str, name: str = "distill"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def small_run_overrides(tmp_path, text_dir) -> list[str]:
    return [
        "debug=fast",
        f"paths.output_dir={tmp_path}",
        f"data.paths=[{text_dir}]",
        "data.glob=*.txt",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "memory.layers=[1,3]",
        "memory.type=[featural,associative]",
        "distill.alpha_hidden=0.1",
        "distill.lr=1e-3",
    ]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_short_distillation_logs_exports_and_reloads(tmp_path, text_dir):
    summary = run.distill(compose_cfg(*small_run_overrides(tmp_path, text_dir)))
    logged = scalars(tmp_path / "tensorboard")
    for tag in (
        "train/loss",
        "train/kd",
        "train/ce",
        "train/hidden",
        "val/ppl_student",
        "val/ppl_teacher",
        "lr-AdamW/dense",
        "lr-AdamW/memory",
    ):
        assert tag in logged, f"{tag} not logged; have {sorted(logged)}"
    for index in (1, 3):
        for stat in ("entries", "inserts", "evictions", "mean_topk_distance"):
            assert f"memory/layer_{index:02d}/{stat}" in logged
        entries = logged[f"memory/layer_{index:02d}/entries"]
        assert entries[-1] > entries[0], "memory did not grow"
    loss = logged["train/loss"]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, f"distillation loss did not fall: {loss}"

    # The export at the end reproduces the trained student, and so does one from the last checkpoint.
    assert summary["export_dir"] and summary["memory_entries"] > 0
    model, tokenizer = load_pretrained(summary["export_dir"])
    assert tokenizer is not None
    tokens = torch.randint(0, 1000, (1, 10))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["dmt"]["memory_state"]) == {"1", "3"}
    with torch.no_grad():
        logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    assert (tmp_path / "summary.json").is_file()


def test_product_key_memory_in_float16_distils_and_reloads(tmp_path, text_dir):
    overrides = [o for o in small_run_overrides(tmp_path, text_dir) if not o.startswith("memory.")]
    overrides += ["memory=featural_product", "memory.layers=[1,3]", "memory.capacity=4096"]
    overrides += ["memory.value_dtype=float16", "trainer.max_steps=4", "evaluate.enabled=false"]
    summary = run.distill(compose_cfg(*overrides))
    model, _ = load_pretrained(summary["export_dir"])
    for layer in memory_layers(model).values():
        store = layer.store
        assert (store.index_backend, store.value_dtype, len(store)) == ("product", "float16", 4096)
        assert store.stats.inserts == 0
        values = store.get(np.arange(4096))[1]
        assert np.count_nonzero(values.any(axis=1)) > 0  # zero-initialised values learned by write-back
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 10))).logits).all()


def test_resume_from_checkpoint_restores_memory(tmp_path, text_dir):
    overrides = small_run_overrides(tmp_path / "a", text_dir)
    first = run.distill(compose_cfg(*overrides))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = run.distill(
        compose_cfg(
            *small_run_overrides(tmp_path / "b", text_dir), f"ckpt_path={ckpt}", "trainer.max_steps=12"
        )
    )
    # Nothing left to train: the resumed student is the checkpointed one, memory included.
    assert resumed["steps"] == first["steps"] == 12
    a, _ = load_pretrained(first["export_dir"])
    b, _ = load_pretrained(resumed["export_dir"])
    tokens = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        assert_close(a(tokens).logits, b(tokens).logits)


def test_train_entry_uses_no_teacher(tmp_path, text_dir):
    cfg = compose_cfg(
        *small_run_overrides(tmp_path, text_dir),
        "trainer.max_steps=3",
        "distill.alpha_hidden=0",
        name="train",
    )
    assert cfg.distill.alpha_kd == 0 and cfg.distill.alpha_ce == 1
    assert not run.uses_teacher(cfg)
    summary = run.distill(cfg)
    assert summary["steps"] == 3


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_cfg(f"experiment={experiment}", f"paths.output_dir={tmp_path}")
    assert cfg.memory.layers is not None and cfg.trainer.max_steps > 0


@pytest.mark.parametrize(
    "override,message",
    [
        ("memory.layers=[9]", "memory.layers: layer 9 does not exist"),
        ("memory.topk=99999", "memory.topk"),
        ("memory.metric=manhattan", "memory.metric"),
        ("data.paths=[/nonexistent/corpus]", "/nonexistent/corpus"),
        ("distill.temperature=0", "distill.temperature"),
    ],
)
def test_invalid_values_fail_before_any_model_loads(override, message, tmp_path, text_dir, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(run, "load_teacher", no_model)
    cfg = compose_cfg(*small_run_overrides(tmp_path, text_dir), override)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run.distill(cfg)


@pytest.mark.parametrize("layer_type,trainable", [("lowrank", "memory"), ("removed", "all")])
def test_baseline_runs_summarise_size_and_budget(layer_type, trainable, tmp_path, text_dir):
    summary = run.distill(
        compose_cfg(
            *small_run_overrides(tmp_path, text_dir),
            f"memory.type={layer_type}",
            f"distill.trainable={trainable}",
            "trainer.max_steps=3",
        )
    )
    assert summary["swapped_layers"] == {"1": layer_type, "3": layer_type}
    assert summary["memory_entries"] == 0 and summary["teacher_blocks"] == 4
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 2 * 64  # debug=fast: 2 × 64 tokens
    assert 0 < summary["fit_seconds"] <= summary["wall_seconds"]
    teacher, student = summary["teacher_dense_parameters"], summary["student_dense_parameters"]
    assert summary["dense_parameter_fraction"] == student / teacher < 1
    if layer_type == "lowrank":  # only the swapped layers train
        assert summary["trainable_parameters"] == summary["swapped_layer_parameters"] > 0
    else:
        assert summary["swapped_layer_parameters"] == 0 and summary["trainable_parameters"] == student
    assert set(summary["evaluation"]) == {"teacher", "student", "ablated"}
    model, _ = load_pretrained(summary["export_dir"])
    assert {i: m.cfg.type for i, m in swapped_layers(model).items()} == {1: layer_type, 3: layer_type}


def test_time_budget_stops_the_run_and_anneals_the_learning_rate(tmp_path, text_dir):
    summary = run.distill(
        compose_cfg(
            *small_run_overrides(tmp_path, text_dir),
            "trainer.max_time=00:00:00:03",
            "trainer.max_steps=100000",
            "distill.warmup_steps=1",
            "evaluate.enabled=false",
            "export=false",
        )
    )
    assert 1 <= summary["steps"] < 100000 and summary["fit_seconds"] >= 3
    assert summary["budget"] == {"max_steps": 100000, "max_time": "00:00:00:03"}
    lrs = scalars(tmp_path / "tensorboard")["lr-AdamW/dense"]
    assert lrs[-1] < 0.5 * max(lrs), f"the learning rate did not decay over max_time: {lrs}"


def test_removed_layers_cannot_train_alone(tmp_path, text_dir, monkeypatch):
    monkeypatch.setattr(run, "load_teacher", lambda *_: pytest.fail("a model was loaded"))
    cfg = compose_cfg(
        *small_run_overrides(tmp_path, text_dir), "memory.type=removed", "distill.trainable=memory"
    )
    with pytest.raises(ValueError, match="distill.trainable: 'memory' trains only the swapped layers"):
        run.distill(cfg)
