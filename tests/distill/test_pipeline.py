"""The real Hydra config, composed and shrunk, run end to end."""

import copy
import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

import dmt.config  # (resolvers)
import dmt.distill.run as run
from dmt.conf import CONF_DIR
from dmt.distill.losses import distillation_divergence, kd_loss
from dmt.distill.module import DistillationModule
from dmt.layers import AssociativeConfig, FeaturalConfig, LowRankConfig, RemovedConfig, layer_config
from dmt.layers.resolve import resolve
from dmt.memory import trained
from dmt.model.families import mlp_form
from dmt.model.loading import teacher_config
from dmt.model.persistence import export_checkpoint, load_pretrained
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs, swapped_layers

CONF = CONF_DIR


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
        "swap.blocks=[1,3]",
        "swap.type=[featural,associative]",
        "distill.alpha_hidden=0.1",
        "distill.lr=1e-3",
    ]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_short_distillation_logs_exports_and_reloads(tmp_path, text_dir, monkeypatch):
    built = []  # the student the run trains

    def build_student(*args, **kwargs):
        built.append(run_build_student(*args, **kwargs))
        return built[-1]

    run_build_student = run.build_student
    monkeypatch.setattr(run, "build_student", build_student)
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
        for stat in ("entries", "inserts_per_step", "evictions_per_step", "mean_topk_distance"):
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
    assert set(ckpt["dmt"]["memory_state"]) == {"1", "3"} and ckpt["global_step"] == summary["steps"]
    from_ckpt, _ = load_pretrained(
        export_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "export_from_ckpt")
    )
    (student,) = built
    with torch.no_grad():
        logits = model(tokens).logits
        assert_close(logits, student.eval()(tokens).logits)
        assert_close(from_ckpt(tokens).logits, logits)
    assert torch.isfinite(logits).all()
    assert (tmp_path / "summary.json").is_file()


def test_run_without_logger_drops_the_monitors_and_completes(tmp_path, text_dir, caplog):
    cfg = compose_cfg(
        *small_run_overrides(tmp_path, text_dir),
        "logger=none",
        "trainer.max_steps=3",
        "evaluate.enabled=false",
    )
    assert "lr_monitor" in cfg.callbacks and "memory_monitor" in cfg.callbacks
    with caplog.at_level(logging.INFO, logger=run.log.name):
        summary = run.distill(cfg)
    dropped = [
        r.getMessage() for r in caplog.records if r.name == run.log.name and "no logger" in r.getMessage()
    ]
    assert dropped == [
        "no logger: running without the callbacks that need one (LearningRateMonitor, MemoryMonitor)"
    ]
    assert summary["steps"] == 3 and summary["export_dir"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3
    assert not (tmp_path / "tensorboard").exists()


def test_product_key_memory_in_float16_distils_and_reloads(tmp_path, text_dir):
    overrides = [o for o in small_run_overrides(tmp_path, text_dir) if not o.startswith("swap.")]
    overrides += ["swap=featural_product", "swap.blocks=[1,3]", "swap.store.capacity=4096"]
    overrides += ["swap.store.value_dtype=float16", "trainer.max_steps=4", "evaluate.enabled=false"]
    summary = run.distill(compose_cfg(*overrides))
    model, _ = load_pretrained(summary["export_dir"])
    for layer in memory_layers(model).values():
        store = layer.store
        assert (store.index_backend, store.value_dtype, len(store)) == ("product", "float16", 4096)
        assert store.stats.inserts == 0
        values = store.get(np.arange(4096))[1]
        assert np.count_nonzero(values.any(axis=1)) > 0  # zero-initialised values learned by write-back
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 10))).logits).all()


def test_memory_on_the_faiss_index_inserts_evicts_and_reloads(tmp_path, text_dir, monkeypatch):
    monkeypatch.setattr(trained, "TRAIN_MIN", 128)  # the lists are trained within the run
    overrides = small_run_overrides(tmp_path, text_dir)
    overrides += [
        "swap/index=faiss",
        "swap.store.capacity=256",
        "trainer.max_steps=4",
        "evaluate.enabled=false",
    ]
    summary = run.distill(compose_cfg(*overrides))
    model, _ = load_pretrained(summary["export_dir"])
    for layer in memory_layers(model).values():
        store = layer.store
        assert (store.index_backend, len(store)) == ("faiss", 256) and store.index_state["trained"]
        assert store.stats.inserts > 256 and store.stats.evictions > 0  # full, and evicting
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


@functools.cache
def _read_teacher_config(teacher_json: str):
    return teacher_config(OmegaConf.create(json.loads(teacher_json)))


def cached_teacher_config(teacher_cfg):
    """``teacher_config``, read once per teacher: reading a GGUF file's metadata takes seconds."""
    key = json.dumps(OmegaConf.to_container(teacher_cfg, resolve=True), sort_keys=True)
    return copy.deepcopy(_read_teacher_config(key))


# SmolLM2-135M: 30 blocks, d_model 576, SwiGLU MLPs of 1536 units. A featural memory seeded from one
# (init: ffn) resolves to exact widths, inner product at temperature 1 and the MLP's silu.
SMOLLM2_FFN = {
    "init": "ffn",
    "key_dim": 577,
    "value_dim": 576,
    "gate_dim": 576,
    "weighting": "silu",
    "metric": "ip",
    "temperature": 1.0,
    "heads": 1,
}
GATED = {**SMOLLM2_FFN, "capacity": 4096, "ranking": "score", "dense_weights": True}
ALL_MEMORY = {**SMOLLM2_FFN, "capacity": 4096, "topk": 768, "ranking": "magnitude", "dense_weights": False}
UPPER, ALL = range(20, 30), range(30)
# experiment -> [(blocks, config class, expected settings)]; together the blocks are the whole plan.
EXPECTED_PLANS = {
    "quickstart": [(range(26, 30), FeaturalConfig, {**GATED, "topk": 64})],
    "quality_base": [(range(26, 30), FeaturalConfig, {**GATED, "topk": 512})],
    "quality_upper_memory": [(UPPER, FeaturalConfig, {**GATED, "topk": 512})],
    "quality_upper_removed": [(UPPER, RemovedConfig, {})],
    "quality_upper_lowrank": [(UPPER, LowRankConfig, {"rank": 577, "init": "ffn"})],
    "quality_all_memory": [(ALL, FeaturalConfig, ALL_MEMORY)],
    "quality_all_removed": [(ALL, RemovedConfig, {})],
    "quality_all_lowrank": [(ALL, LowRankConfig, {"rank": 100, "init": "ffn"})],
    "associative_cache": [
        (
            range(29, 30),
            AssociativeConfig,
            {"keep_mlp": True, "inserted_values": "next_token", "lrfu_lambda": 1.0, "output_gain": 4.0},
        )
    ],
    "associative_units": [
        (
            UPPER,
            AssociativeConfig,
            {**SMOLLM2_FFN, "capacity": 8192, "topk": 512, "ranking": "magnitude", "novelty_threshold": -3.0},
        )
    ],
    "tiny_mixed": [
        (range(0, 2), FeaturalConfig, {"init": "empty", "capacity": 20000, "gate_dim": 0}),
        (range(2, 4), AssociativeConfig, {"capacity": 20000}),
    ],
}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_every_expected_plan_is_an_experiment():
    assert set(EXPECTED_PLANS) <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path, monkeypatch):
    cfg = compose_cfg(f"experiment={experiment}", f"paths.output_dir={tmp_path}")
    assert cfg.swap.blocks is not None and cfg.trainer.max_steps > 0
    monkeypatch.setattr(dmt.config, "teacher_config", cached_teacher_config)
    plan = dmt.config.validate_config(cfg)
    assert plan, f"{experiment} swaps no block"
    # Every config is resolved: nothing left to derive, and it survives the round trip of a saved config.
    mlp = mlp_form(cached_teacher_config(cfg.teacher))
    for index, layer in plan.items():
        assert resolve(layer, mlp.d_model, mlp) == layer, index
        assert layer_config(layer.to_dict()) == layer, index
        memory = ("key_dim", "value_dim", "temperature", "metric", "capacity", "weighting", "gate_dim")
        derivable = memory if layer.has_store else ("rank",) if isinstance(layer, LowRankConfig) else ()
        assert all(getattr(layer, key) is not None for key in derivable), (index, layer)
    if experiment not in EXPECTED_PLANS:
        return
    expected = EXPECTED_PLANS[experiment]
    assert sorted(plan) == sorted(i for blocks, _, _ in expected for i in blocks)
    for blocks, cls, settings in expected:
        for index in blocks:
            layer = plan[index]
            assert type(layer) is cls, (index, layer)
            assert {key: getattr(layer, key) for key in settings} == settings, (index, layer)


@pytest.mark.parametrize(
    "override,message",
    [
        ("swap.blocks=[9]", "swap.blocks: block 9 does not exist"),
        ("swap.read.topk=99999", "swap.read.topk"),
        ("swap.read.metric=manhattan", "swap.read.metric"),
        ("data.paths=[/nonexistent/corpus]", "/nonexistent/corpus"),
        ("distill.temperature=0", "distill.temperature"),
        ("distill.divergence=kl", "distill.divergence"),
        ("distill.jsd_beta=1.5", "distill.jsd_beta"),
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
            f"swap.type={layer_type}",
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
        *small_run_overrides(tmp_path, text_dir), "swap.type=removed", "distill.trainable=memory"
    )
    with pytest.raises(ValueError, match="distill.trainable: 'memory' trains only the swapped layers"):
        run.distill(cfg)


def _module_from_config(cfg, student, teacher) -> DistillationModule:
    """The module as ``run.distill`` builds it: every ``distill`` key passed through."""
    return DistillationModule(student, teacher, **OmegaConf.to_container(cfg.distill, resolve=True))


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_divergence_option_composes_and_chooses_the_kd_term(divergence, tmp_path, tiny_gpt2):
    cfg = compose_cfg(
        f"paths.output_dir={tmp_path}", f"distill.divergence={divergence}", "distill.jsd_beta=0.3"
    )
    student = build_student(
        tiny_gpt2, resolve_layer_configs({"blocks": [1], "type": "removed"}, tiny_gpt2.config)
    )
    module = _module_from_config(cfg, student, tiny_gpt2).eval()  # eval: no dropout, the same logits twice
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        kd = module.losses({"input_ids": ids, "attention_mask": mask})["kd"]
        student_logits = module(ids, mask)
        teacher_logits = tiny_gpt2(input_ids=ids, attention_mask=mask).logits
    temperature = cfg.distill.temperature
    expected = distillation_divergence(divergence, student_logits, teacher_logits, mask, temperature, 0.3)
    assert_close(kd, expected)
    assert not torch.isclose(kd, kd_loss(student_logits, teacher_logits, mask, temperature))


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "distill.divergence=kl",
            r"distill\.divergence: expected one of forward_kl, reverse_kl, jsd, got 'kl'",
        ),
        ("distill.jsd_beta=1.5", r"distill\.jsd_beta: must be in \[0, 1\], got 1\.5"),
    ],
)
def test_bad_divergence_settings_name_the_key(override, message, tmp_path, tiny_gpt2):
    cfg = compose_cfg(f"paths.output_dir={tmp_path}", override)
    with pytest.raises(ValueError, match=message):
        _module_from_config(cfg, copy.deepcopy(tiny_gpt2), tiny_gpt2)


def test_held_out_sources_are_evaluated_one_by_one(tmp_path, tiny_gpt2, gpt2_tokenizer):
    """``data=broad`` holds whole sources out: each gets its own perplexities, beside the validation's."""
    from conftest import tiny_student

    texts = {
        "validation": ["To be, or not to be, that is the question. " * 8],
        "bbc_news": ["The minister said on Monday that the budget would rise. " * 8],
        "sherlock_holmes": ["I had seen little of Holmes lately. My marriage had drifted us away. " * 8],
    }

    class Data:
        def val_texts(self):
            return texts["validation"]

        def heldout_texts(self):
            return {name: texts[name] for name in ("bbc_news", "sherlock_holmes")}

    cfg = compose_cfg(
        "evaluate.cache_dir=null", "evaluate.prompts=[]", "evaluate.window=32", "evaluate.stride=16"
    )
    student = tiny_student(tiny_gpt2, torch.randint(0, 1000, (2, 16)))
    validation, heldout = run.evaluate_on_held_out(cfg, tiny_gpt2, student, gpt2_tokenizer, Data(), tmp_path)
    assert set(validation) == {"teacher", "student", "ablated"}
    assert set(heldout) == {"bbc_news", "sherlock_holmes"}
    written = json.loads((tmp_path / "eval_heldout.json").read_text())
    for source, rows in heldout.items():
        assert {row["name"]: row["perplexity"] for row in written[source]["rows"]} == rows
    assert heldout["bbc_news"]["teacher"] != heldout["sherlock_holmes"]["teacher"]

    # evaluate.ablated=false: the same student and teacher perplexities, without the ablated teacher.
    cfg.evaluate.ablated = False
    without, heldout_without = run.evaluate_on_held_out(
        cfg, tiny_gpt2, student, gpt2_tokenizer, Data(), tmp_path
    )
    assert without == {name: validation[name] for name in ("teacher", "student")}
    assert heldout_without == {
        source: {name: rows[name] for name in ("teacher", "student")} for source, rows in heldout.items()
    }
