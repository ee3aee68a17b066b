"""The resolver: settings derived from the model and the MLP a layer replaces, and what contradicts it."""

import pytest

from dmt.layers import AssociativeConfig, FeaturalConfig, LowRankConfig, MLPForm, RemovedConfig
from dmt.layers.baselines import matched_rank
from dmt.layers.resolve import GENERIC, resolve, resolve_baseline

SWIGLU = MLPForm(d_model=32, units=64, activation="silu", gated=True, key_bias=False, out_bias=False)


@pytest.mark.parametrize("cls", [FeaturalConfig, AssociativeConfig])
def test_empty_init_resolves_to_generic_defaults_and_keeps_explicit_values(cls):
    cfg = cls(heads=4)
    assert all(
        getattr(cfg, key) is None for key in ("key_dim", "value_dim", "temperature", "metric", "capacity")
    )
    resolved = resolve(cfg, 32)
    assert {key: getattr(resolved, key) for key in GENERIC} == GENERIC
    assert resolved.value_dim == 8  # d_model // heads
    explicit = resolve(cls(key_dim=16, value_dim=4, temperature=0.1, metric="cosine", capacity=128), 32)
    assert (explicit.key_dim, explicit.value_dim, explicit.temperature) == (16, 4, 0.1)
    assert (explicit.metric, explicit.capacity) == ("cosine", 128)


def test_ffn_init_derives_the_mlp_widths_and_read():
    resolved = resolve(FeaturalConfig(init="ffn"), 32, SWIGLU)
    assert (resolved.key_dim, resolved.value_dim, resolved.gate_dim) == (33, 32, 32)
    assert (resolved.weighting, resolved.metric, resolved.temperature) == ("silu", "ip", 1.0)
    assert resolved.capacity == 64  # one entry per unit


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"heads": 2}, r"swap\.read\.heads: init=ffn seeds one head"),
        ({"metric": "cosine"}, r"swap\.read\.metric: the silu MLP .* needs 'ip'"),
        ({"gate_dim": 0}, r"swap\.read\.gate_dim: 0 would drop the MLP's up projection"),
        ({"key_dim": 40}, r"swap\.read\.key_dim: at most 33 for this MLP"),
        ({"capacity": 63}, r"swap\.store\.capacity: 63 cannot hold the MLP's 64 units"),
    ],
)
def test_ffn_init_refuses_settings_that_contradict_the_mlp(settings, match):
    with pytest.raises(ValueError, match=match):
        resolve(FeaturalConfig(init="ffn", **settings), 32, SWIGLU)


def test_ffn_init_needs_the_mlp_of_the_model():
    with pytest.raises(ValueError, match=r"swap\.store\.init: init=ffn derives the layer from the MLP"):
        resolve(FeaturalConfig(init="ffn"), 32)
    with pytest.raises(ValueError, match=r"swap\.store\.init: the MLP reads width 32, the model is 16 wide"):
        resolve(FeaturalConfig(init="ffn"), 16, SWIGLU)


def test_dense_weights_false_needs_the_hidden_states_widths():
    with pytest.raises(ValueError, match=r"swap\.read\.key_dim: dense_weights=false needs key_dim=33"):
        resolve(FeaturalConfig(dense_weights=False), 32)
    resolved = resolve(FeaturalConfig(dense_weights=False, key_dim=33, value_dim=32), 32)
    assert (resolved.key_dim, resolved.value_dim) == (33, 32)


def test_inserted_residual_stream_values_need_its_width():
    with pytest.raises(ValueError, match=r"swap\.read\.value_dim: inserted_values=next_token"):
        resolve(AssociativeConfig(heads=4, value_dim=4, inserted_values="next_token"), 32)
    assert resolve(AssociativeConfig(heads=4, inserted_values="next_token"), 32).value_dim == 8


def test_associative_ffn_init_derives_the_mlp_read_and_keeps_room_for_the_tokens():
    cfg = AssociativeConfig(init="ffn", weighting=None, gate_dim=None, capacity=256, novelty_threshold=0.5)
    resolved = resolve(cfg, 32, SWIGLU)
    assert (resolved.key_dim, resolved.value_dim, resolved.gate_dim) == (33, 32, 32)
    assert (resolved.weighting, resolved.metric, resolved.temperature) == ("silu", "ip", 1.0)
    assert resolved.capacity == 256  # room for the tokens' own entries beside the 64 units
    with pytest.raises(
        ValueError, match=r"swap\.read\.weighting: the silu MLP .* needs 'silu', got 'softmax'"
    ):
        resolve(AssociativeConfig(init="ffn"), 32, SWIGLU)


def test_lowrank_rank_null_is_sized_against_the_memory_it_stands_against():
    with pytest.raises(ValueError, match=r"swap\.store\.rank: null is resolved with the memory settings"):
        resolve(LowRankConfig(), 32, SWIGLU)
    assert resolve(LowRankConfig(rank=8), 32, SWIGLU).rank == 8
    memory = FeaturalConfig(init="ffn", key_dim=8)
    matched = resolve_baseline(LowRankConfig(init="ffn"), memory, SWIGLU)
    assert matched == LowRankConfig(rank=matched_rank(resolve(memory, 32, SWIGLU), SWIGLU), init="ffn")
    assert resolve_baseline(LowRankConfig(rank=3), memory, SWIGLU).rank == 3
    assert resolve_baseline(RemovedConfig(), memory, SWIGLU) == RemovedConfig()
    with pytest.raises(ValueError, match=r"swap\.read\.metric"):  # the memory is validated alike
        resolve_baseline(RemovedConfig(), FeaturalConfig(init="ffn", metric="l2"), SWIGLU)
