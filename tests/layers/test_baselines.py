"""Dense baselines: the removed MLP, the low-rank MLP (form, size, warm start) and their settings."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from dmt.layers import AssociativeMemory, FeaturalMemory, LowRankMLP, MemoryLayerConfig, RemovedMLP
from dmt.layers.baselines import (
    lowrank_parameters,
    matched_rank,
    memory_layer_parameters,
    unit_importance,
)
from dmt.model.families import FAMILIES, FFNWeights, get_mlp
from dmt.model.surgery import count_parameters


def ffn_of(model, index: int = 1) -> FFNWeights:
    return FAMILIES[model.config.model_type].ffn_weights(get_mlp(model, index))


def test_removed_outputs_zeros_and_has_no_parameters():
    layer = RemovedMLP()
    x = torch.randn(2, 5, 16)
    assert_close(layer(x), torch.zeros_like(x))
    assert count_parameters(layer) == 0 and layer.cfg.type == "removed"


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("extra", [0, 8])
def test_lowrank_at_full_width_is_the_teacher_mlp(fixture, extra, request):
    # r = U keeps every unit: the teacher's MLP exactly (GPT-2's tanh GELU included). Wider, the extra
    # units start with zero values, so the function is unchanged, but they learn.
    teacher = request.getfixturevalue(fixture)
    ffn = ffn_of(teacher)
    units, d_model = ffn.keys.shape
    layer = LowRankMLP(d_model, MemoryLayerConfig(type="lowrank", rank=units + extra, init="ffn"), ffn)
    x = torch.randn(2, 3, d_model)
    with torch.no_grad():
        assert_close(layer(x), get_mlp(teacher, 1).eval()(x))
    assert layer.width == units + extra and layer.cfg.rank == units + extra
    if extra:
        layer(x).pow(2).sum().backward()
        assert layer.values.weight.grad[:, units:].abs().sum() > 0


def test_lowrank_keeps_the_most_important_units(tiny_llama):
    ffn = ffn_of(tiny_llama)
    d_model = ffn.keys.shape[1]
    # Make units 3, 10 and 40 stand out in one of the three norms each.
    keys, gates, values = ffn.keys.clone(), ffn.gate_keys.clone(), ffn.values.clone()
    keys[3] *= 100
    gates[10] *= 100
    values[40] *= 100
    boosted = FFNWeights(keys, None, values, None, "silu", nn.SiLU(), gate_keys=gates)
    assert set(unit_importance(boosted).topk(3).indices.tolist()) == {3, 10, 40}
    layer = LowRankMLP(d_model, MemoryLayerConfig(type="lowrank", rank=3, init="ffn"), boosted)
    assert_close(layer.keys.weight, keys[[3, 10, 40]])
    assert_close(layer.gate_keys.weight, gates[[3, 10, 40]])
    assert_close(layer.values.weight, values[[3, 10, 40]].T)
    # init: empty keeps the random initialisation.
    cold = LowRankMLP(d_model, MemoryLayerConfig(type="lowrank", rank=3), boosted)
    assert not torch.allclose(cold.keys.weight, keys[[3, 10, 40]])


@pytest.mark.parametrize(
    "settings",
    [
        {"type": "featural", "key_dim": 8},
        {"type": "featural", "key_dim": 17, "glu_dim": 16},
        {"type": "featural", "key_dim": 17, "glu_dim": 16, "projections": False},
        {"type": "featural", "key_dim": 8, "heads": 2, "value_dim": 4},
        {"type": "associative", "key_dim": 8, "heads": 4},
    ],
)
def test_memory_layer_parameters_match_the_layers(settings):
    cfg = MemoryLayerConfig(capacity=64, topk=4, **settings)
    layer_cls = FeaturalMemory if cfg.type == "featural" else AssociativeMemory
    assert memory_layer_parameters(16, cfg) == count_parameters(layer_cls(16, cfg))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_matched_rank_has_the_memory_layers_parameter_count(fixture, request):
    ffn = ffn_of(request.getfixturevalue(fixture))
    d_model = ffn.keys.shape[1]
    cfg = MemoryLayerConfig(
        type="lowrank", key_dim=d_model + 1, glu_dim=d_model if ffn.gate_keys is not None else 0
    )
    layer = LowRankMLP(d_model, cfg, ffn)
    target = memory_layer_parameters(d_model, MemoryLayerConfig(key_dim=cfg.key_dim, glu_dim=cfg.glu_dim))
    per_unit = 3 * d_model if ffn.gate_keys is not None else 2 * d_model + 1
    assert abs(count_parameters(layer) - target) <= per_unit / 2


def test_matched_rank_of_the_quickstart_recipe_on_smollm2():
    # d_model 576, key_dim 577, glu_dim 576: 997,633 memory parameters; SwiGLU units cost 3 x 576 each.
    cfg = MemoryLayerConfig(type="lowrank", key_dim=577, glu_dim=576)
    assert memory_layer_parameters(576, MemoryLayerConfig(key_dim=577, glu_dim=576)) == 997_633
    rank = matched_rank(576, cfg, gated=True, key_bias=False, out_bias=False)
    assert rank == 577
    assert lowrank_parameters(576, rank, gated=True, key_bias=False, out_bias=False) == 997_056


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"type": "dense"}, "memory.type: unknown layer type 'dense'"),
        ({"type": "featural", "rank": 8}, "memory.rank: only lowrank layers have a rank"),
        ({"type": "lowrank", "rank": 0}, "memory.rank: must be >= 1"),
        ({"type": "associative", "glu_dim": 8}, "memory.glu_dim"),
        ({"type": "associative", "init": "ffn"}, "memory.init"),
    ],
)
def test_bad_baseline_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        MemoryLayerConfig(**settings)


def test_baselines_accept_the_memory_recipe_they_replace():
    # A run swaps `type: featural` for a baseline and keeps every other memory setting.
    recipe = {"key_dim": 577, "glu_dim": 576, "init": "ffn", "weighting": "silu", "metric": "ip"}
    for layer_type in ("removed", "lowrank"):
        assert MemoryLayerConfig(type=layer_type, **recipe).has_store is False
    with pytest.raises(ValueError, match="memory.type: 'removed' is not a memory layer"):
        memory_layer_parameters(16, MemoryLayerConfig(type="removed"))
