"""Per-type layer configs: their settings' groups, each setting's own checks, and the round trip through
to_dict."""

import json

import pytest

from dmt.errors import ConfigError
from dmt.layers import (
    AssociativeConfig,
    FeaturalConfig,
    LowRankConfig,
    MLPForm,
    RemovedConfig,
    layer_config,
)
from dmt.layers.config import GROUPS, SETTING_GROUPS, swap_key
from dmt.layers.resolve import resolve

SWIGLU = MLPForm(d_model=32, units=64, activation="silu", gated=True, key_bias=False, out_bias=False)


@pytest.mark.parametrize(
    "cfg",
    [
        resolve(FeaturalConfig(topk=4, novelty_threshold=0.2, index={"backend": "exact"}), 32),
        resolve(FeaturalConfig(init="ffn", topk=64, ranking="magnitude", dense_weights=False), 32, SWIGLU),
        resolve(AssociativeConfig(heads=4, metric="cosine", temperature=0.1), 32),
        resolve(AssociativeConfig(heads=4, inserted_values="next_token", keep_mlp=True), 32),
        resolve(AssociativeConfig(init="ffn", weighting=None, gate_dim=None, capacity=128), 32, SWIGLU),
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


def test_a_kept_mlp_is_not_added_twice():
    with pytest.raises(ValueError, match=r"swap\.output\.keep_mlp: the kept MLP already adds its output"):
        AssociativeConfig(inserted_values="mlp_output", keep_mlp=True)


def test_associative_settings_saved_before_the_read_settings_existed_load_as_softmax_and_ungated():
    saved = resolve(AssociativeConfig(heads=4, metric="cosine", temperature=0.1), 32).to_dict()
    for key in ("weighting", "gate_dim", "init"):
        del saved[key]
    loaded = layer_config(saved)
    assert (loaded.weighting, loaded.gate_dim, loaded.init) == ("softmax", 0, "empty")


def test_ffn_init_refuses_what_would_not_read_the_mlp_units():
    with pytest.raises(ValueError, match=r"swap\.write\.inserted_values: init=ffn reads the MLP's units"):
        AssociativeConfig(init="ffn", inserted_values="next_token")
    with pytest.raises(ValueError, match=r"swap\.output\.keep_mlp: init=ffn stores the MLP's units already"):
        AssociativeConfig(init="ffn", keep_mlp=True)


def test_output_gain_is_a_setting_of_residual_stream_values():
    with pytest.raises(ValueError, match=r"swap\.output\.output_gain: projected values are not"):
        AssociativeConfig(output_gain=2.0)
    assert AssociativeConfig(inserted_values="next_token", keep_mlp=True, output_gain=4.0).output_gain == 4.0


def test_every_setting_has_one_group_and_errors_name_it():
    assert set(SETTING_GROUPS.values()) == {*GROUPS, None}
    assert [name for name, group in SETTING_GROUPS.items() if group is None] == ["index"]
    assert swap_key("topk") == "swap.read.topk" and swap_key("blocks") == "swap.blocks"
    with pytest.raises(ValueError, match=r"^swap\.read\.topk: must be >= 1, got 0$"):
        FeaturalConfig(topk=0)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"backend": "hnsw", "nprobe": 4}, "swap.index.nprobe: not a setting of the hnsw backend; it has"),
        ({"backend": "exact", "M": 16}, "swap.index.M: not a setting of the exact backend; it has none"),
        ({"backend": "auto", "probe_cells": 4}, "swap.index.probe_cells: not a setting of the auto"),
        ({"backend": "faiss", "ef_search": 8}, "swap.index.ef_search: not a setting of the faiss backend"),
        ({"backend": "usearch"}, "swap.index: unknown index backend 'usearch'"),
    ],
)
def test_index_settings_of_another_backend_are_refused(index, message):
    with pytest.raises(ConfigError) as error:
        FeaturalConfig(key_dim=8, metric="ip", capacity=64, index=index)
    assert str(error.value).startswith(message)
