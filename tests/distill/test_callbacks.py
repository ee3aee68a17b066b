"""MemoryMonitor: interval rates of the memory layers, at the trainer's logging interval, with histograms."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pipeline import compose_cfg, scalars, small_run_overrides

import dmt.distill.run as run
from dmt.distill.callbacks import MemoryMonitor, interval_scalars
from dmt.layers import FeaturalMemory, layer_config
from dmt.layers.arithmetic import layer_multiply_adds
from dmt.layers.resolve import resolve
from dmt.memory import MemoryStats
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs, swapped_layers


def test_interval_scalars_are_rates_per_step_and_distinct_entries_per_search():
    cfg = resolve(
        layer_config(
            {"type": "featural", "key_dim": 8, "topk": 4, "capacity": 256, "novelty_threshold": None}
        ),
        16,
    )
    torch.manual_seed(0)
    layer = FeaturalMemory(16, cfg).train()
    rng = np.random.default_rng(0)
    layer.store.insert(
        rng.standard_normal((64, 8), dtype=np.float32), np.zeros((64, layer.entry_dim), np.float32)
    )
    layer.start_run(clock=-1)  # every entry counts as inserted during the run
    searches = []  # (ids, distances) as numpy of each search the layer makes
    search = layer.store.search_torch

    def recording_search(*args, **kwargs):
        ids, distances = search(*args, **kwargs)
        searches.append((ids.numpy(), distances.numpy()))
        return ids, distances

    layer.store.search_torch = recording_search
    for _ in range(2):  # two micro-batches (gradient accumulation) of one optimiser step, twice
        layer(torch.randn(2, 5, 16))
        layer(torch.randn(2, 5, 16))

    scalars = dict(interval_scalars(layer, steps=2, last=MemoryStats()))
    valid = [ids >= 0 for ids, _ in searches]
    distinct = [len(np.unique(ids[found])) for (ids, _), found in zip(searches, valid, strict=True)]
    assert len(searches) == 4 and all(found.all() for found in valid)
    assert scalars["entries"] == 64 and scalars["inserts_per_step"] == 32  # 64 inserts over 2 steps
    assert scalars["reads_per_step"] == 4 * 2 * 5 * 4 / 2  # 4 searches of 10 queries × top-4, over 2 steps
    # Distinct entries do not add up over searches: their mean per search, as a share of the entries.
    assert scalars["distinct_share"] == pytest.approx(np.mean(distinct) / 64)
    all_distances = np.concatenate([d.ravel() for _, d in searches])
    assert scalars["mean_topk_distance"] == pytest.approx(all_distances.mean(), rel=1e-6)
    assert scalars["new_read_share"] == 1.0
    assert layer.take_read_counts().reads == 0  # the next interval starts afresh


def test_memory_monitor_refuses_a_trainer_without_logger():
    with pytest.raises(MisconfigurationException, match="MemoryMonitor .* no logger"):
        MemoryMonitor().on_fit_start(SimpleNamespace(loggers=[]), None)


@pytest.mark.parametrize("setting", ["recall_every_n_steps", "histogram_every_n_steps"])
def test_memory_monitor_rejects_negative_intervals(setting):
    with pytest.raises(ValueError, match=f"callbacks.memory_monitor.{setting}"):
        MemoryMonitor(**{setting: -1})


class RecordingLogger:
    """A logger that keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((step, metrics))

    def arithmetic(self) -> list[tuple[int, dict[str, float]]]:
        return [(step, m) for step, m in self.calls if any(tag.startswith("arithmetic/") for tag in m)]


def test_arithmetic_is_logged_at_train_start_and_again_when_a_store_grows(tiny_gpt2):
    configs = resolve_layer_configs(
        {
            "blocks": [0, 2],
            "type": ["featural", "removed"],
            "key_dim": 8,
            "topk": 4,
            "capacity": 64,
            "index": {"backend": "exact"},
        },
        tiny_gpt2.config,
    )
    student = build_student(tiny_gpt2, configs)
    module = SimpleNamespace(
        student=student, swapped_layers=swapped_layers(student), memory_layers=memory_layers(student)
    )
    logger = RecordingLogger()
    trainer = SimpleNamespace(global_step=0, loggers=[logger], log_every_n_steps=1, is_global_zero=True)
    monitor = MemoryMonitor()
    monitor.on_train_start(trainer, module)
    featural = module.memory_layers[0]
    mlp = 2 * 32 * 128  # GPT-2 MLP: 32 → 128 → 32
    start = {
        "arithmetic/layer_00/multiply_adds_per_token": float(32 * 8 + 32 * 32),  # projections only
        "arithmetic/layer_00/mlp_fraction": (32 * 8 + 32 * 32) / mlp,
        "arithmetic/layer_02/multiply_adds_per_token": 0.0,
        "arithmetic/layer_02/mlp_fraction": 0.0,
        "arithmetic/mlp_fraction": (32 * 8 + 32 * 32) / (2 * mlp),
    }
    assert logger.arithmetic() == [(0, pytest.approx(start))]
    trainer.global_step = 1  # a step with an unchanged store: nothing new to log
    monitor.on_train_batch_end(trainer, module)
    assert len(logger.arithmetic()) == 1
    filled = 10
    rng = np.random.default_rng(0)
    featural.store.insert(
        rng.standard_normal((filled, 8), dtype=np.float32), np.zeros((filled, featural.entry_dim), np.float32)
    )
    trainer.global_step = 2
    monitor.on_train_batch_end(trainer, module)
    step, logged = logger.arithmetic()[-1]
    grown = layer_multiply_adds(featural).total
    assert step == 1 and grown == 32 * 8 + 32 * 32 + filled * 8 + 4 * (8 + 32)
    assert logged["arithmetic/layer_00/multiply_adds_per_token"] == grown
    assert logged["arithmetic/mlp_fraction"] == pytest.approx(grown / (2 * mlp))


def test_memory_scalars_and_histograms_land_at_the_logging_interval(tmp_path, text_dir):
    cfg = compose_cfg(
        *small_run_overrides(tmp_path, text_dir),
        "trainer.max_steps=9",
        "trainer.log_every_n_steps=3",
        "trainer.accumulate_grad_batches=2",
        "callbacks.memory_monitor.recall_every_n_steps=4",
        "callbacks.memory_monitor.histogram_every_n_steps=6",
        "evaluate.enabled=false",
        "export=false",
    )
    summary = run.distill(cfg)
    log_dir = tmp_path / "tensorboard"
    logged = scalars(log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()

    def steps(tag: str) -> list[int]:
        return [event.step for event in events.Scalars(tag)]

    # Steps 3, 6 and 9 are logged, on the axis of Lightning's own values (the 0-based index of the step).
    assert steps("train/loss") == [2, 5, 8]
    memory_tags = [tag for tag in logged if tag.startswith("memory/")]
    for index in (1, 3):
        prefix = f"memory/layer_{index:02d}/"
        for stat in ("entries", "inserts_per_step", "reads_per_step", "distinct_share", "new_read_share"):
            assert prefix + stat in memory_tags, sorted(memory_tags)
        # recall at the first logging step at or after each multiple of 4
        assert steps(prefix + "recall_at_k") == [5, 8]
        # 2 micro-batches × 2 sequences × 64 tokens × top-8 per step, once the store holds 8 entries
        assert logged[prefix + "reads_per_step"][1:] == [2 * 2 * 64 * 8] * 2
        assert all(0 < share <= 1 for share in logged[prefix + "distinct_share"])
        scores, reads = (events.Histograms(prefix + name) for name in ("lrfu_score", "read_count"))
        assert [h.step for h in scores] == [h.step for h in reads] == [5]
        entries = logged[prefix + "entries"][1]
        assert scores[0].histogram_value.num == reads[0].histogram_value.num == entries
        # lrfu_lambda 0: an entry's LRFU score counts its reads and its insert
        assert reads[0].histogram_value.sum > 0
        assert scores[0].histogram_value.sum == reads[0].histogram_value.sum + entries
    for tag in memory_tags:
        if not tag.endswith("recall_at_k"):
            assert steps(tag) == [2, 5, 8], tag
    # Arithmetic at train start (empty stores), then where the stores grew; the last is the summary's.
    arithmetic = summary["arithmetic"]
    assert steps("arithmetic/mlp_fraction")[0] == 0
    assert set(steps("arithmetic/mlp_fraction")) <= {0, 2, 5, 8}
    assert logged["arithmetic/mlp_fraction"][-1] == pytest.approx(arithmetic["mlp_fraction"])
    for index in ("1", "3"):
        per_token = logged[f"arithmetic/layer_{int(index):02d}/multiply_adds_per_token"]
        assert per_token[0] < per_token[-1] == arithmetic["blocks"][index]["total"]
        assert arithmetic["blocks"][index]["mlp"] == 2 * 64 * 256  # tiny_gpt2: 64 → 256 → 64
