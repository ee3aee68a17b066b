"""Dense baselines: the removed MLP, the low-rank MLP (form, size, warm start) and their settings."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from dmt.layers import (
    FeaturalConfig,
    FFNWeights,
    LowRankConfig,
    LowRankMLP,
    MLPForm,
    RemovedConfig,
    RemovedMLP,
    build_memory_layer,
    layer_config,
)
from dmt.layers.baselines import (
    lowrank_parameters,
    matched_rank,
    memory_layer_parameters,
    unit_importance,
)
from dmt.layers.resolve import resolve
from dmt.model.families import get_mlp, mlp_weights
from dmt.model.surgery import count_parameters, resolve_layer_configs


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
    ffn = mlp_weights(teacher, 1)
    units, d_model = ffn.keys.shape
    layer = LowRankMLP(d_model, LowRankConfig(rank=units + extra, init="ffn"), ffn)
    x = torch.randn(2, 3, d_model)
    with torch.no_grad():
        assert_close(layer(x), get_mlp(teacher, 1).eval()(x))
    assert layer.width == units + extra and layer.cfg.rank == units + extra
    if extra:
        layer(x).pow(2).sum().backward()
        assert layer.values.weight.grad[:, units:].abs().sum() > 0


def test_lowrank_keeps_the_most_important_units(tiny_llama):
    ffn = mlp_weights(tiny_llama, 1)
    d_model = ffn.keys.shape[1]
    # Make units 3, 10 and 40 stand out in one of the three norms each.
    keys, gates, values = ffn.keys.clone(), ffn.gate_keys.clone(), ffn.values.clone()
    keys[3] *= 100
    gates[10] *= 100
    values[40] *= 100
    boosted = FFNWeights(keys, None, values, None, "silu", nn.SiLU(), gate_keys=gates)
    assert set(unit_importance(boosted).topk(3).indices.tolist()) == {3, 10, 40}
    layer = LowRankMLP(d_model, LowRankConfig(rank=3, init="ffn"), boosted)
    assert_close(layer.keys.weight, keys[[3, 10, 40]])
    assert_close(layer.gate_keys.weight, gates[[3, 10, 40]])
    assert_close(layer.values.weight, values[[3, 10, 40]].T)
    # init: empty keeps the random initialisation.
    cold = LowRankMLP(d_model, LowRankConfig(rank=3), boosted)
    assert not torch.allclose(cold.keys.weight, keys[[3, 10, 40]])


@pytest.mark.parametrize(
    "settings",
    [
        {"type": "featural", "key_dim": 8},
        {"type": "featural", "key_dim": 17, "gate_dim": 16},
        {"type": "featural", "key_dim": 17, "gate_dim": 16, "dense_weights": False},
        {"type": "featural", "key_dim": 8, "heads": 2, "value_dim": 4},
        {"type": "associative", "key_dim": 8, "heads": 4},
    ],
)
def test_memory_layer_parameters_match_the_layers(settings):
    cfg = resolve(layer_config({"capacity": 64, "topk": 4, **settings}), 16)
    assert memory_layer_parameters(16, cfg) == count_parameters(build_memory_layer(16, cfg))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_matched_rank_has_the_memory_layers_parameter_count(fixture, request):
    ffn = mlp_weights(request.getfixturevalue(fixture), 1)
    d_model = ffn.keys.shape[1]
    memory = resolve(
        FeaturalConfig(key_dim=d_model + 1, gate_dim=d_model if ffn.gate_keys is not None else 0), d_model
    )
    layer = LowRankMLP(d_model, LowRankConfig(rank=matched_rank(memory, ffn.form)), ffn)
    target = memory_layer_parameters(d_model, memory)
    per_unit = 3 * d_model if ffn.gate_keys is not None else 2 * d_model + 1
    assert abs(count_parameters(layer) - target) <= per_unit / 2


def test_matched_rank_of_the_quickstart_recipe_on_smollm2():
    # d_model 576, key_dim 577, gate_dim 576: 997,633 memory parameters; SwiGLU units cost 3 x 576 each.
    smollm2 = MLPForm(d_model=576, units=1536, activation="silu", gated=True, key_bias=False, out_bias=False)
    cfg = resolve(FeaturalConfig(key_dim=577, gate_dim=576), 576)
    assert memory_layer_parameters(576, cfg) == 997_633
    rank = matched_rank(cfg, smollm2)
    assert rank == 577
    assert lowrank_parameters(576, rank, gated=True, key_bias=False, out_bias=False) == 997_056


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"type": "dense"}, "swap.type: unknown layer type 'dense'"),
        ({"type": "featural", "rank": 8}, "swap.store.rank: not a setting of featural layers"),
        ({"type": "lowrank", "rank": 0}, "swap.store.rank: must be >= 1"),
        (
            {"type": "associative", "dense_weights": False},
            "swap.read.dense_weights: not a setting of associative layers",
        ),
        ({"type": "associative", "init": "fn"}, "swap.store.init: unknown init 'fn'"),
    ],
)
def test_bad_baseline_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        layer_config(settings)


def test_baselines_accept_the_memory_recipe_they_replace(tiny_llama):
    # A run swaps `type: featural` for a baseline and keeps every other memory setting.
    recipe = {"key_dim": 33, "gate_dim": 32, "init": "ffn", "weighting": "silu", "metric": "ip"}
    for layer_type in ("removed", "lowrank"):
        configs = resolve_layer_configs({"blocks": [0], "type": layer_type, **recipe}, tiny_llama.config)
        assert configs[0].type == layer_type and configs[0].has_store is False
    with pytest.raises(ValueError, match="swap.type: 'removed' is not a memory layer"):
        build_memory_layer(16, RemovedConfig())
