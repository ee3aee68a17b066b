"""Multiply-adds per token of swapped layers and of the MLPs they replace, counted by hand."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmt.layers import FFNWeights, LowRankConfig, LowRankMLP, RemovedMLP, build_memory_layer, layer_config
from dmt.layers.arithmetic import MultiplyAdds, layer_multiply_adds, mlp_multiply_adds, swap_arithmetic
from dmt.memory import trained
from dmt.memory.hnsw import derived_ef
from dmt.memory.scann_index import MIN_REORDER
from dmt.model.families import mlp_form, mlp_weights
from dmt.model.surgery import build_student, resolve_layer_configs, swapped_layers

C = 16  # residual width of the hand-built layers


def filled(layer, count: int, seed: int = 0):
    """``layer`` with ``count`` random entries in its store."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((count, layer.key_dim), dtype=np.float32)
    layer.store.insert(keys, np.zeros((count, layer.entry_dim), np.float32))
    return layer


def memory(**settings):
    """A memory layer of width ``C`` from ``swap`` settings (exact index unless given)."""
    settings = {"index": {"backend": "exact"}, **settings}
    return build_memory_layer(C, layer_config(settings))


def test_dense_gated_featural_counts_projections_search_and_read():
    # 2 heads: query C → 2·8, gate query C → 2·4, output 2·8 → C; 20 live entries, top-4.
    layer = filled(
        memory(type="featural", heads=2, key_dim=8, gate_dim=4, topk=4, capacity=64),
        20,
    )
    assert layer.value_dim == 8
    counts = layer_multiply_adds(layer)
    assert counts.projections == C * 2 * 8 + C * 2 * 4 + 2 * 8 * C
    assert counts.search == 2 * 20 * 8  # every live key scored, per head
    assert counts.read == 2 * 4 * (8 + 4 + 8)  # distances, gate dots, value mix of the top-4, per head
    assert counts.total == counts.projections + counts.search + counts.read
    assert not counts.search_estimated
    # Fewer entries than k: only those are read. An empty store costs the projections alone.
    assert layer_multiply_adds(layer, store_entries=2).read == 2 * 2 * 20
    empty = layer_multiply_adds(layer, store_entries=0)
    assert (empty.search, empty.read, empty.total) == (0, 0, counts.projections)


def seeded_swiglu_layer(units: int, d_model: int, **settings):
    """A projection-free gated featural layer seeded from a random SwiGLU MLP of ``units`` units."""
    generator = torch.Generator().manual_seed(0)
    ffn = FFNWeights(
        keys=torch.randn(units, d_model, generator=generator),
        key_bias=None,
        values=torch.randn(units, d_model, generator=generator),
        out_bias=None,
        activation="silu",
        act_fn=F.silu,
        gate_keys=torch.randn(units, d_model, generator=generator),
    )
    cfg = layer_config(
        {"type": "featural", "init": "ffn", "dense_weights": False, "index": {"backend": "exact"}, **settings}
    )
    layer = build_memory_layer(d_model, cfg, mlp=ffn.form)
    layer.init_from_ffn(ffn)
    return layer, ffn.form


def test_projection_free_featural_reading_every_unit_of_a_swiglu_store():
    units, d_model = 24, 8
    layer, form = seeded_swiglu_layer(units, d_model, topk=units)
    assert len(layer.store) == units and layer.key_dim == d_model + 1
    counts = layer_multiply_adds(layer)
    assert counts.projections == 0  # [x, 1] queries, x as gate query, an output bias
    assert counts.search == units * (d_model + 1)  # the exact index scores every unit's [k, b]
    assert counts.read == units * (d_model + 1) + units * 2 * d_model  # distances, then gate and value
    assert mlp_multiply_adds(form) == 3 * d_model * units
    # The exact index ranks by |q·k| in the same single pass over the units.
    by_magnitude, _ = seeded_swiglu_layer(units, d_model, topk=units // 2, ranking="magnitude")
    counts = layer_multiply_adds(by_magnitude)
    assert counts.search == units * (d_model + 1)
    assert counts.read == units // 2 * (3 * d_model + 1)


@pytest.mark.parametrize(
    ("index", "by_score", "searches"),
    [
        ({"backend": "exact"}, 64 * 8, 1),  # every entry of the full store scored
        ({"backend": "product"}, 8 * 8, 1),  # 2 tables of 8 sub-keys of 4 dims, scored once for q and -q
        ({"backend": "hnsw", "M": 8, "ef_search": 10}, 10 * 8 * 8, 2),  # a graph walk for q and for -q
    ],
)
def test_ranking_by_magnitude_searches_twice_only_on_hnsw(index, by_score, searches):
    settings = {"type": "featural", "key_dim": 8, "topk": 4, "capacity": 64, "metric": "ip", "index": index}
    by_magnitude = {"ranking": "magnitude", "weighting": "silu", "novelty_threshold": None}
    counts = []
    for ranking in ({}, by_magnitude):
        layer = memory(**settings, **ranking)
        counts.append(layer_multiply_adds(layer if layer.store.keys_are_fixed else filled(layer, 64)).search)
    assert counts == [by_score, searches * by_score]


def test_hnsw_search_is_an_estimate_from_ef_and_m():
    fixed = filled(
        memory(
            type="featural",
            key_dim=8,
            topk=4,
            capacity=64,
            index={"backend": "hnsw", "M": 8, "ef_search": 10},
        ),
        20,
    )
    counts = layer_multiply_adds(fixed)
    assert counts.search_estimated and counts.search == 10 * 8 * 8
    derived = filled(memory(type="featural", key_dim=8, topk=4, capacity=64, index={"backend": "hnsw"}), 20)
    assert layer_multiply_adds(derived).search == derived_ef(4, 20) * 16 * 8  # hnswlib's default M
    assert layer_multiply_adds(derived, store_entries=0).search == 0


@pytest.mark.parametrize(("fixture", "factor"), [("tiny_gpt2", 2), ("tiny_llama", 3)])
def test_baselines_and_mlps(fixture, factor, request):
    teacher = request.getfixturevalue(fixture)
    ffn = mlp_weights(teacher, 0)
    units, d_model = ffn.keys.shape
    assert mlp_multiply_adds(mlp_form(teacher.config)) == factor * d_model * units
    lowrank = LowRankMLP(d_model, LowRankConfig(rank=5), ffn)
    assert layer_multiply_adds(lowrank) == MultiplyAdds(projections=factor * d_model * 5)
    assert layer_multiply_adds(RemovedMLP()).total == 0


def test_swap_arithmetic_per_block_and_in_total(tiny_llama):
    configs = resolve_layer_configs(
        {
            "blocks": [0, 1, 3],
            "type": ["featural", "lowrank", "removed"],
            "key_dim": 8,
            "topk": 4,
            "capacity": 64,
            "per_block": {1: {"rank": 6}},
            "index": {"backend": "exact"},
        },
        tiny_llama.config,
    )
    student = build_student(tiny_llama, configs)
    layers = swapped_layers(student)
    filled(layers[0], 30)
    arithmetic = swap_arithmetic(layers, mlp_form(student.config))
    mlp = 3 * 32 * 64
    featural = layer_multiply_adds(layers[0])
    assert arithmetic["blocks"]["0"] == {
        "type": "featural",
        **featural.to_dict(),
        "mlp": mlp,
        "mlp_fraction": featural.total / mlp,
    }
    assert arithmetic["blocks"]["1"]["total"] == 3 * 32 * 6 and arithmetic["blocks"]["3"]["total"] == 0
    assert arithmetic["total"] == featural.total + 3 * 32 * 6 and arithmetic["mlp"] == 3 * mlp
    assert arithmetic["mlp_fraction"] == pytest.approx(arithmetic["total"] / (3 * mlp))
    assert not arithmetic["search_estimated"]
    assert json.loads(json.dumps(arithmetic)) == arithmetic
    assert swap_arithmetic({}, mlp_form(student.config))["mlp_fraction"] is None


def test_refuses_a_layer_that_was_not_swapped_in():
    with pytest.raises(TypeError, match="Linear"):
        layer_multiply_adds(nn.Linear(4, 4))


def test_a_memory_beside_its_kept_mlp_also_pays_for_the_mlp(tiny_llama):
    plan = {"blocks": [0, 1], "type": "associative", "heads": 2, "key_dim": 8, "topk": 4, "capacity": 64}
    plan |= {"index": {"backend": "exact"}, "per_block": {1: {"keep_mlp": True}}}
    layers = swapped_layers(build_student(tiny_llama, resolve_layer_configs(plan, tiny_llama.config)))
    alone, beside = (layer_multiply_adds(filled(layers[i], 30)) for i in (0, 1))
    assert beside.projections == alone.projections + 3 * 32 * 64  # SwiGLU: gate, up and down matrices
    assert (beside.search, beside.read) == (alone.search, alone.read)


@pytest.mark.parametrize(
    ("index", "re_ranked"),
    [
        ({"backend": "faiss", "nlist": 16, "nprobe": 2}, 0),
        ({"backend": "scann", "leaves": 16, "leaves_to_search": 2}, MIN_REORDER),  # and its re-ranked keys
    ],
)
def test_a_partitioned_search_counts_the_centres_and_the_visited_partitions_mean_keys(
    monkeypatch, index, re_ranked
):
    monkeypatch.setattr(trained, "TRAIN_MIN", 500)
    layer = memory(type="featural", key_dim=8, topk=4, capacity=1024, index=index)
    filled(layer, 400)
    assert layer_multiply_adds(layer).search == 400 * 8  # not trained yet: exact
    filled(layer, 240, seed=1)
    assert layer.store.index_state["trained"]
    counts = layer_multiply_adds(layer)
    assert counts.search == (16 + 640 * 2 // 16 + re_ranked) * 8 and counts.search_estimated
