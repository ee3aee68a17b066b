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
    if cls is FeaturalConfig:
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
        RemovedConfig(),
        LowRankConfig(rank=8, init="ffn"),
    ],
    ids=["featural", "featural_ffn", "associative", "associative_cache", "removed", "lowrank"],
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
