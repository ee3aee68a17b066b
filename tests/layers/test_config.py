"""Per-type layer configs: generic defaults for what is not derived, and the round trip through to_dict."""

import json

import pytest

from dmt.layers import (
    AssociativeConfig,
    FeaturalConfig,
    LowRankConfig,
    MLPForm,
    RemovedConfig,
    layer_config,
)

SWIGLU = MLPForm(d_model=32, units=64, activation="silu", gated=True, key_bias=False, out_bias=False)
GENERIC = {"key_dim": 64, "temperature": 1.0, "metric": "ip", "capacity": 65536}


@pytest.mark.parametrize("cls", [FeaturalConfig, AssociativeConfig])
def test_empty_init_resolves_to_generic_defaults_and_keeps_explicit_values(cls):
    cfg = cls(heads=4)
    assert all(getattr(cfg, key) is None for key in [*GENERIC, "value_dim"])
    resolved = cfg.resolved(32)
    assert {key: getattr(resolved, key) for key in GENERIC} == GENERIC
    assert resolved.value_dim == 8  # d_model // heads
    assert (resolved.weighting, resolved.gate_dim) == ("softmax", 0)
    explicit = cls(key_dim=16, value_dim=4, temperature=0.1, metric="cosine", capacity=128).resolved(32)
    assert (explicit.key_dim, explicit.value_dim, explicit.temperature) == (16, 4, 0.1)
    assert (explicit.metric, explicit.capacity) == ("cosine", 128)


def test_lowrank_rank_null_is_left_to_the_plan():
    with pytest.raises(ValueError, match=r"swap\.rank: null is resolved with the memory settings"):
        LowRankConfig().resolved(32, SWIGLU)
    assert LowRankConfig(rank=8).resolved(32, SWIGLU).rank == 8


@pytest.mark.parametrize(
    "cfg",
    [
        FeaturalConfig(topk=4, novelty_threshold=0.2, index={"backend": "exact"}).resolved(32),
        FeaturalConfig(init="ffn", topk=64, ranking="magnitude", dense_weights=False).resolved(32, SWIGLU),
        AssociativeConfig(heads=4, metric="cosine", temperature=0.1).resolved(32),
        AssociativeConfig(heads=4, inserted_values="next_token", keep_mlp=True).resolved(32),
        AssociativeConfig(init="ffn", weighting=None, gate_dim=None, capacity=128).resolved(32, SWIGLU),
        RemovedConfig(),
        LowRankConfig(rank=8, init="ffn"),
    ],
    ids=[
        "featural",
        "featural_ffn",
        "associative",
        "associative_cache",
        "associative_ffn",
        "removed",
        "lowrank",
    ],
)
def test_to_dict_round_trips_through_layer_config(cfg):
    saved = json.loads(json.dumps(cfg.to_dict()))  # as dmt_config.json holds it
    assert saved["type"] == cfg.type
    loaded = layer_config(saved)
    assert type(loaded) is type(cfg) and loaded == cfg


def test_inserted_residual_stream_values_need_its_width_and_no_second_mlp():
    with pytest.raises(ValueError, match="swap.value_dim: inserted_values=next_token"):
        AssociativeConfig(heads=4, value_dim=4, inserted_values="next_token").resolved(32)
    with pytest.raises(ValueError, match="swap.keep_mlp"):
        AssociativeConfig(inserted_values="mlp_output", keep_mlp=True)


def test_associative_settings_saved_before_the_read_settings_existed_load_as_softmax_and_ungated():
    saved = AssociativeConfig(heads=4, metric="cosine", temperature=0.1).resolved(32).to_dict()
    for key in ("weighting", "gate_dim", "init"):
        del saved[key]
    loaded = layer_config(saved)
    assert (loaded.weighting, loaded.gate_dim, loaded.init) == ("softmax", 0, "empty")


def test_associative_ffn_init_derives_the_mlp_read_and_refuses_what_contradicts_it():
    cfg = AssociativeConfig(init="ffn", weighting=None, gate_dim=None, capacity=256, novelty_threshold=0.5)
    resolved = cfg.resolved(32, SWIGLU)
    assert (resolved.key_dim, resolved.value_dim, resolved.gate_dim) == (33, 32, 32)
    assert (resolved.weighting, resolved.metric, resolved.temperature) == ("silu", "ip", 1.0)
    assert resolved.capacity == 256  # room for the tokens' own entries beside the 64 units
    with pytest.raises(ValueError, match=r"swap\.weighting: the silu MLP .* needs 'silu', got 'softmax'"):
        AssociativeConfig(init="ffn").resolved(32, SWIGLU)
    with pytest.raises(ValueError, match=r"swap\.inserted_values: init=ffn reads the MLP's units"):
        AssociativeConfig(init="ffn", inserted_values="next_token")
    with pytest.raises(ValueError, match=r"swap\.keep_mlp: init=ffn stores the MLP's units already"):
        AssociativeConfig(init="ffn", keep_mlp=True)


def test_output_gain_is_a_setting_of_residual_stream_values():
    with pytest.raises(ValueError, match=r"swap\.output_gain: projected values are not residual-stream"):
        AssociativeConfig(output_gain=2.0)
    assert AssociativeConfig(inserted_values="next_token", keep_mlp=True, output_gain=4.0).output_gain == 4.0
