"""Per-entry origins and reads recorded by the memory layers: MLP units for a seeded featural store, the
text span of each inserting token for an associative one, and both surviving save/load and state dicts."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dmt.layers import (
    AssociativeMemory,
    FeaturalConfig,
    FeaturalMemory,
    FFNWeights,
    MemoryProtocol,
    layer_config,
)
from dmt.layers.protocol import current
from dmt.layers.resolve import resolve
from dmt.memory import ORIGIN_SPAN, KNNStore


def _assert_same_entries(store: KNNStore, restored: KNNStore) -> None:
    ids = store.live_ids()
    np.testing.assert_array_equal(restored.live_ids(), ids)
    np.testing.assert_array_equal(restored.read_counts(ids), store.read_counts(ids))
    for got, want in zip(restored.origins(ids), store.origins(ids), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dense_weights", [True, False])
def test_featural_layer_seeded_from_an_ffn_records_its_units(dense_weights: bool) -> None:
    torch.manual_seed(0)
    d_model, units = 12, 48
    ffn = FFNWeights(
        torch.randn(units, d_model), torch.randn(units), torch.randn(units, d_model), None, "relu", torch.relu
    )
    cfg = FeaturalConfig(topk=8, init="ffn", dense_weights=dense_weights, capacity=64)
    layer = FeaturalMemory(d_model, resolve(cfg, d_model, ffn.form))
    layer.init_from_ffn(ffn)
    ids = layer.store.live_ids()
    np.testing.assert_array_equal(ids, np.arange(units))
    origin_units, origin_tokens = layer.store.origins(ids)
    np.testing.assert_array_equal(origin_units, np.arange(units))
    assert (origin_tokens == -1).all()  # seeded, not inserted by a token


def test_associative_layer_records_spans_and_reads_that_survive_persistence(tmp_path: Path) -> None:
    settings = {"type": "associative", "key_dim": 8, "heads": 2, "topk": 4, "capacity": 256}
    layer = AssociativeMemory(16, resolve(layer_config({**settings, "novelty_threshold": 0.0}), 16)).train()
    batch, length, heads = 2, 10, 2
    input_ids = torch.randint(0, 50_000, (batch, length), generator=torch.Generator().manual_seed(1))
    with MemoryProtocol({3: layer}).forward(input_ids):
        layer(torch.randn(batch, length, 16))  # an empty store: every query row is novel and inserted
    assert current().token_ids is None
    ids = layer.store.live_ids()
    assert len(ids) == batch * length * heads  # row n went to slot n
    _, spans = layer.store.origins(ids)
    row = 27  # head 1 of token (b, t) = divmod(27 // 2, 10) = (1, 3): three ids of its row, then padding
    np.testing.assert_array_equal(spans[row], [-1] * (ORIGIN_SPAN - 4) + input_ids[1, :4].tolist())
    for n in range(len(ids)):
        b, t = divmod(n // heads, length)
        start = max(0, t - ORIGIN_SPAN + 1)
        expected = [-1] * (ORIGIN_SPAN - (t + 1 - start)) + input_ids[b, start : t + 1].tolist()
        np.testing.assert_array_equal(spans[n], expected)
    layer(torch.randn(batch, length, 16))  # outside the context: inserted without origin tokens
    fresh = np.setdiff1d(layer.store.live_ids(), ids)
    assert len(fresh) and (layer.store.origins(fresh)[1] == -1).all()
    reads = layer.store.read_counts(layer.store.live_ids())
    assert reads.sum() == layer.store.stats.reads > 0  # the second forward's search referenced entries
    layer(torch.randn(batch, length, 16))
    assert layer.store.read_counts(layer.store.live_ids()).sum() > reads.sum()
    layer.store.save(tmp_path / "store")
    _assert_same_entries(layer.store, KNNStore.load(tmp_path / "store"))
    state = {  # as a checkpoint holds it: tensors (dmt.model.checkpoint.memory_state)
        name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for name, value in layer.store.state_dict().items()
    }
    restored = KNNStore.from_state_dict(
        {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in state.items()}
    )
    _assert_same_entries(layer.store, restored)


def test_token_ids_must_match_the_query_rows() -> None:
    settings = {"type": "associative", "key_dim": 8, "heads": 2, "topk": 4, "capacity": 256}
    layer = AssociativeMemory(16, resolve(layer_config({**settings, "novelty_threshold": 0.0}), 16)).train()
    with (
        MemoryProtocol({0: layer}).forward(torch.zeros(2, 4, dtype=torch.long)),
        pytest.raises(ValueError, match="token_ids"),
    ):
        layer(torch.randn(2, 5, 16))
    assert current().token_ids is None
