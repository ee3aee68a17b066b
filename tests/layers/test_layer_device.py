"""Memory layers keep their store on their own device: the search path's host copies, ``.to()``, and (with
CUDA) a layer searching on the GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dmt.layers import AssociativeMemory, FeaturalMemory, layer_config
from dmt.layers.resolve import resolve
from dmt.memory import KNNStore

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
D_MODEL, KEY_DIM, HEADS, TOPK = 16, 8, 2, 4
INDEXES = {
    "exact": {"index": {"backend": "exact"}},
    "product": {
        "metric": "ip",
        "temperature": 1.0,
        "novelty_threshold": None,
        "index": {"backend": "product"},
    },
    "hnsw": {"index": {"backend": "hnsw", "ef_search": 64}},
}


def make(layer_cls: type, index: str, **overrides) -> FeaturalMemory | AssociativeMemory:
    """A layer on the ``index`` backend whose store was filled by one training forward (or is full)."""
    settings = {
        "type": "associative" if layer_cls is AssociativeMemory else "featural",
        "key_dim": KEY_DIM,
        "heads": HEADS,
        "topk": TOPK,
        "capacity": 256,
        "novelty_threshold": 0.0,
        **INDEXES[index],
        **overrides,
    }
    torch.manual_seed(0)
    layer = layer_cls(D_MODEL, resolve(layer_config(settings), D_MODEL)).train()
    layer(torch.randn(2, 5, D_MODEL))
    return layer


@pytest.mark.parametrize(
    ("layer_cls", "index"),
    [(FeaturalMemory, "exact"), (FeaturalMemory, "product"), (AssociativeMemory, "exact")],
)
def test_torch_index_layers_hand_only_ids_and_distances_to_numpy(layer_cls, index, numpy_conversions):
    layer = make(layer_cls, index).eval()
    numpy_conversions.clear()
    layer(torch.randn(3, 5, D_MODEL))
    queries = 3 * 5 * HEADS
    assert numpy_conversions == [((queries, TOPK), torch.int64), ((queries, TOPK), torch.float32)]


def test_hnsw_layer_copies_its_queries_to_the_host_once(numpy_conversions):
    layer = make(FeaturalMemory, "hnsw").eval()
    numpy_conversions.clear()
    layer(torch.randn(3, 5, D_MODEL))
    queries = 3 * 5 * HEADS
    # The queries once, then the results as the other layers get them (on the host: views, no copies).
    assert numpy_conversions == [
        ((queries, KEY_DIM), torch.float32),
        ((queries, TOPK), torch.int64),
        ((queries, TOPK), torch.float32),
    ]


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_a_non_finite_query_is_refused(index):
    layer = make(FeaturalMemory, index)
    hidden = torch.randn(2, 5, D_MODEL)
    hidden[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(hidden)


def test_moving_an_empty_initialised_layer_leaves_the_store_on_the_host():
    layer = make(FeaturalMemory, "exact")
    # A model built on the meta device gets its weights later (dmt.model.persistence); the store has data.
    layer.to("meta")
    assert layer.store.device.type == "cpu" and len(layer.store) > 0


@CUDA
@pytest.mark.parametrize(
    ("layer_cls", "index"),
    [
        (FeaturalMemory, "exact"),
        (FeaturalMemory, "product"),
        (AssociativeMemory, "exact"),
        (FeaturalMemory, "hnsw"),
    ],
)
def test_a_layer_on_cuda_searches_on_cuda(layer_cls, index):
    layer = make(layer_cls, index)
    on_host = copy.deepcopy(layer)
    layer.cuda()
    assert layer.store.device.type == ("cpu" if index == "hnsw" else "cuda")
    hidden, target = torch.randn(2, 5, D_MODEL), torch.randn(2, 5, D_MODEL)
    for module, device in ((on_host, "cpu"), (layer, "cuda")):
        loss = (module(hidden.to(device)) - target.to(device)).pow(2).mean()
        loss.backward()
        module.apply_value_updates()
    assert len(layer.store) == len(on_host.store)
    live = on_host.store.live_ids()
    np.testing.assert_allclose(layer.store.get(live)[1], on_host.store.get(live)[1], atol=1e-5)
    with torch.no_grad():
        assert_close(layer(hidden.cuda()).cpu(), on_host(hidden), atol=1e-4, rtol=1e-4)
    # A store swapped in on the host (a restored checkpoint) moves at the layer's next search.
    layer.store = KNNStore.from_state_dict(on_host.store.state_dict())
    layer.eval()(hidden.cuda())
    assert layer.store.device.type == ("cpu" if index == "hnsw" else "cuda")
