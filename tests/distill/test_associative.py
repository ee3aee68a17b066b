"""Associative students learning on a tiny teacher: inserts, eviction by policy and the memory metrics."""

import numpy as np
import pytest
import torch
from conftest import tiny_teacher_cfg
from test_pipeline import compose_cfg, scalars

import dmt.distill.run as run
from dmt.distill.module import DistillationModule
from dmt.model.loading import load_teacher
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs

TOKENS = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(3))


def associative_student(teacher, **settings):
    """Associative memories inserting the teacher MLP's outputs in blocks 2 and 3 of a tiny Llama."""
    heads = 4
    plan = {
        "blocks": [2, 3],
        "type": "associative",
        "heads": heads,
        "key_dim": 8,
        "value_dim": teacher.config.hidden_size // heads,
        "topk": 4,
        "metric": "cosine",
        "temperature": 0.1,
        "capacity": 4096,
        "novelty_threshold": 0.05,
        "inserted_values": "mlp_output",
        **settings,
    }
    return build_student(teacher, resolve_layer_configs(plan, teacher.config))


def train(module: DistillationModule, steps: int, batches: list[torch.Tensor], lr: float = 1e-4) -> list:
    """Steps as Lightning runs them (loss, backward, value write-back, AdamW, commit); returns the losses."""
    module.on_fit_start()
    optimizer = torch.optim.AdamW([p for p in module.student.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        tokens = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = module.losses({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})["loss"]
        loss.backward()
        module.memory.write_back_values()
        optimizer.step()
        module.memory.commit()
        losses.append(float(loss))
    return losses


def test_associative_student_loss_falls_as_it_inserts_mlp_outputs():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    torch.manual_seed(0)
    # The tiny model's MLP outputs are small (~1e-3), and the hidden loss is relative: the write-back
    # rate must be small to match.
    student = associative_student(teacher, value_lr=1e-5)
    module = DistillationModule(student, teacher, alpha_kd=1.0, alpha_hidden=1.0, trainable="memory")
    losses = train(module, 8, [TOKENS[:2], TOKENS[2:]])
    stores = [layer.store for layer in memory_layers(student).values()]
    assert all(len(store) > 0 for store in stores)
    # An empty store outputs nothing (loss ~1, the relative error of zeros); stored MLP outputs recover most.
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses


def test_inserted_values_are_the_teacher_mlp_outputs():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = associative_student(teacher, novelty_threshold=-1.0)  # every token is novel: all inserted
    module = DistillationModule(student, teacher, alpha_kd=0.0, alpha_hidden=1.0, trainable="memory")
    module.on_fit_start()
    tokens = TOKENS[:1]
    mlp_out = {}
    handle = teacher.model.layers[3].mlp.register_forward_hook(lambda _m, _i, out: mlp_out.setdefault(3, out))
    module.losses({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})
    handle.remove()
    module.memory.commit()
    layer = memory_layers(student)[3]
    values = layer.store.get(np.arange(len(layer.store)))[1]  # (T·H, Dv) in insertion order
    torch.testing.assert_close(torch.from_numpy(values), mlp_out[3].reshape(-1, layer.value_dim))
    # losses() hands the layers the input ids: the last entry came from the last token (its last head).
    spans = layer.store.origins(np.arange(len(layer.store)))[1]  # (T·H, ORIGIN_SPAN)
    np.testing.assert_array_equal(spans[-1], tokens[0, -spans.shape[1] :].numpy())


@pytest.mark.parametrize("eviction", ["fifo", "lrfu", "random"])
def test_a_full_store_evicts_by_its_policy_during_training(eviction):
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    torch.manual_seed(0)
    capacity = 96  # one step inserts up to 2 x 32 tokens x 4 heads = 256 entries
    student = associative_student(teacher, capacity=capacity, eviction=eviction, lrfu_lambda=1.0)
    module = DistillationModule(student, teacher, alpha_kd=1.0, alpha_hidden=1.0, trainable="memory")
    store = memory_layers(student)[3].store
    inserted: list[np.ndarray] = []  # slot ids in insertion order
    insert = store.insert

    def recording_insert(*args):
        ids = insert(*args)
        inserted.append(ids[ids >= 0])
        return ids

    store.insert = recording_insert
    train(module, 4, [TOKENS[:2], TOKENS[2:]])
    assert len(store) == capacity and store.stats.evictions == store.stats.inserts - capacity > 0
    assert store.stats.inserts == sum(map(len, inserted))
    last = np.concatenate(inserted)[-capacity:]  # slots of the last `capacity` entries inserted
    if eviction == "fifo":  # none of them was evicted: they are the whole store
        np.testing.assert_array_equal(np.sort(last), np.arange(capacity))
        order = np.argsort(store.insertion_times(last), kind="stable")
        np.testing.assert_array_equal(order, np.arange(capacity))  # stored in insertion order


def test_associative_run_logs_per_step_rates_and_recall(tmp_path, text_dir):
    cfg = compose_cfg(
        "debug=fast",
        "teacher=tiny_llama",
        "swap=associative",
        f"paths.output_dir={tmp_path}",
        f"data.paths=[{text_dir}]",
        "data.glob=*.txt",
        "trainer.max_steps=6",
        "swap.blocks=[3]",
        "swap.store.capacity=256",
        "swap.read.value_dim=16",
        "swap.write.inserted_values=mlp_output",
        "swap/index=hnsw",
        "callbacks.memory_monitor.recall_every_n_steps=2",
        "distill.alpha_hidden=1.0",
    )
    summary = run.distill(cfg)
    logged = scalars(tmp_path / "tensorboard")
    prefix = "memory/layer_03/"
    for stat in ("inserts_per_step", "evictions_per_step", "reads_per_step", "distinct_share"):
        assert prefix + stat in logged, sorted(logged)
    assert logged[prefix + "entries"][-1] == 256 and summary["memory_entries"] == 256
    assert max(logged[prefix + "evictions_per_step"]) > 0
    assert all(0.0 <= share <= 1.0 for share in logged[prefix + "new_read_share"])
    assert logged[prefix + "new_read_share"][-1] > 0  # reads served by entries this run inserted
    assert logged[prefix + "recall_at_k"] and min(logged[prefix + "recall_at_k"]) >= 0.95


@pytest.mark.slow
def test_associative_upper_learns_on_the_real_teacher(tmp_path):
    """The shipped experiment on SmolLM2-135M, shortened: stores fill, evict and are searched by hnswlib."""
    cfg = compose_cfg(
        "experiment=associative_upper",
        f"paths.output_dir={tmp_path}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=1",
        "data.max_val_blocks=2",
        "swap.store.capacity=4096",
        "callbacks.memory_monitor.recall_every_n_steps=3",
        "evaluate.enabled=false",
        "export=false",
    )
    summary = run.distill(cfg)
    logged = scalars(tmp_path / "tensorboard")
    for index in range(26, 30):
        prefix = f"memory/layer_{index:02d}/"
        assert logged[prefix + "entries"][-1] == 4096
        assert logged[prefix + "evictions_per_step"][-1] > 0
        assert min(logged[prefix + "recall_at_k"]) >= 0.95
    assert summary["memory_entries"] == 4 * 4096
    loss = logged["train/loss"]
    assert loss[-1] < loss[1], loss  # step 0 reads an empty store; from step 1 on, the inserts are read


def test_a_memory_beside_the_mlp_starts_as_the_teacher_and_caches_next_tokens():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    torch.manual_seed(0)
    student = associative_student(
        teacher, inserted_values="next_token", keep_mlp=True, novelty_threshold=-1.0, value_lr=0.0
    )
    with torch.no_grad():  # the output projection starts at zero: the teacher's logits exactly
        torch.testing.assert_close(student.eval()(TOKENS).logits, teacher(TOKENS).logits)
    student.train()
    module = DistillationModule(student, teacher, alpha_kd=1.0, alpha_ce=1.0, trainable="memory")
    layer = memory_layers(student)[3]
    kept = {name: p.detach().clone() for name, p in layer.mlp.named_parameters()}
    assert kept and not any(p.requires_grad for p in layer.mlp.parameters())
    assert layer.out_proj.weight.requires_grad
    module.on_fit_start()
    tokens = TOKENS[:1]
    module.losses({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})
    module.memory.commit()
    # Each token but the last stored its successor's input embedding, each head its slice.
    values = layer.store.get(np.arange(len(layer.store)))[1]  # ((T - 1)·H, Dv) in insertion order
    following = teacher.get_input_embeddings()(tokens[0, 1:]).reshape(-1, layer.value_dim)
    torch.testing.assert_close(torch.from_numpy(values), following)
    # The memory learns what to add; the kept MLP stays the teacher's.
    train(module, 3, [TOKENS[:2], TOKENS[2:]], lr=1e-2)
    assert layer.out_proj.weight.abs().sum() > 0
    for name, p in layer.mlp.named_parameters():
        torch.testing.assert_close(p, kept[name])


@pytest.mark.parametrize(("settings", "gain"), [({}, 0.0), ({"output_gain": 4.0}, 4.0)])
def test_a_cache_beside_the_mlp_starts_at_its_output_gain(settings, gain):
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = associative_student(teacher, inserted_values="next_token", keep_mlp=True, **settings)
    for layer in memory_layers(student).values():
        torch.testing.assert_close(layer.out_proj.weight, gain * torch.eye(teacher.config.hidden_size))
        torch.testing.assert_close(layer.out_proj.bias, torch.zeros(teacher.config.hidden_size))


def test_next_token_values_need_the_input_ids():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = associative_student(teacher, inserted_values="next_token", keep_mlp=True).train()
    with pytest.raises(RuntimeError, match="input ids"):
        student(TOKENS)


def test_an_associative_memory_seeded_from_the_mlp_units_starts_as_the_mlp_and_grows_by_inserting():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    torch.manual_seed(0)
    units = teacher.config.intermediate_size
    plan = {"blocks": [2, 3], "type": "associative", "init": "ffn", "weighting": None, "gate_dim": None}
    plan |= {"topk": units, "capacity": 8 * units, "novelty_threshold": -1.0, "value_lr": 1e-3}
    plan |= {"index": {"backend": "exact"}, "ranking": "magnitude"}
    student = build_student(teacher, resolve_layer_configs(plan, teacher.config))
    layer = memory_layers(student)[3]
    hidden_size = teacher.config.hidden_size
    assert (layer.cfg.weighting, layer.cfg.gate_dim, len(layer.store)) == ("silu", hidden_size, units)
    with torch.no_grad():  # k = every unit, no token entry yet: the teacher's logits
        torch.testing.assert_close(student.eval()(TOKENS).logits, teacher(TOKENS).logits)
    module = DistillationModule(student.train(), teacher, alpha_kd=1.0, trainable="memory")
    train(module, 6, [TOKENS[:2], TOKENS[2:]], lr=1e-3)
    # Every token of the first step stored its projected key and value and its unit-length gate query.
    tokens_per_step = 2 * TOKENS.shape[1]
    assert len(layer.store) == units + 6 * tokens_per_step
    keys, entries = layer.store.get(np.arange(units, units + tokens_per_step))
    gate_keys = entries[:, layer.value_dim :]
    np.testing.assert_allclose(np.linalg.norm(gate_keys, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(keys, 0.0)  # the key projection starts at zero: the first entries are inert
    # The straight-through rules train the projections the tokens' entries come from.
    assert layer.key_proj.weight.abs().sum() > 0 and layer.value_proj.weight.abs().sum() > 0
    keys = layer.store.get(np.arange(len(layer.store) - tokens_per_step, len(layer.store)))[0]
    assert np.abs(keys).sum() > 0  # and the latest entries are keyed by it
