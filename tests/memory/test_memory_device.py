"""Stores on a torch device: the torch search path, device copies kept in step with writes, and the
one-pass ranking by |q·k| of the torch indexes against the two-search merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmt.memory import KNNStore
from dmt.memory.index import merge_by_magnitude

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rand(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _store(backend: str, metric: str = "ip", capacity: int = 64, filled: int = 40) -> KNNStore:
    """An 8-d store with ``filled`` random entries (a full one for product keys) and a hole at slot 3."""
    store = KNNStore(8, 3, capacity=capacity, metric=metric, index={"backend": backend, "ef_search": 64})
    if not store.keys_are_fixed:
        store.insert(_rand(filled, 8, 0), _rand(filled, 3, 1))
        store._remove(np.array([3]))
    return store


@pytest.mark.parametrize(
    ("backend", "metric", "by_magnitude"),
    [("exact", "ip", False), ("exact", "ip", True), ("exact", "l2", False), ("product", "ip", True)],
)
def test_torch_indexes_search_tensors_without_numpy(backend, metric, by_magnitude, numpy_conversions):
    store = _store(backend, metric)
    queries = torch.from_numpy(_rand(5, 8, 2))
    expected = store.search(queries.numpy(), 6, by_magnitude=by_magnitude)
    numpy_conversions.clear()
    ids, distances = store.search_torch(queries, 6, by_magnitude=by_magnitude)
    assert numpy_conversions == []  # neither the queries nor the results went through numpy
    assert ids.dtype == torch.int64 and distances.dtype == torch.float32 and ids.shape == (5, 6)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(distances, expected[1])
    assert store.stats.queries == 10


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_hnsw_search_copies_the_queries_to_the_host_once(by_magnitude, numpy_conversions):
    store = _store("hnsw")
    queries = torch.from_numpy(_rand(5, 8, 2))
    ids, distances = store.search_torch(queries, 6, by_magnitude=by_magnitude)
    assert numpy_conversions == [((5, 8), torch.float32)]
    expected = store.search(queries.numpy(), 6, by_magnitude=by_magnitude)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(distances, expected[1])


def test_search_torch_checks_its_arguments():
    store = _store("exact")
    with pytest.raises(ValueError, match=r"queries must have shape \(N, 8\), got \(5, 7\)"):
        store.search_torch(torch.zeros(5, 7), 2)
    with pytest.raises(ValueError, match="floating-point tensor, got dtype torch.int64"):
        store.search_torch(torch.zeros(5, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="k must be an integer"):
        store.search_torch(torch.zeros(5, 8), 0)
    with pytest.raises(ValueError, match="by_magnitude .* not l2"):
        _store("exact", "l2").search_torch(torch.zeros(5, 8), 2, by_magnitude=True)
    # Half-precision queries are searched as float32.
    ids, _ = store.search_torch(torch.from_numpy(_rand(3, 8, 2)).half(), 4)
    np.testing.assert_array_equal(ids, store.search(_rand(3, 8, 2).astype(np.float16), 4)[0])


@pytest.mark.parametrize(("backend", "metric"), [("exact", "ip"), ("exact", "cosine"), ("product", "ip")])
@pytest.mark.parametrize(("filled", "k"), [(40, 8), (40, 30), (12, 30)])  # k > n/2: the sides overlap
def test_one_pass_magnitude_ranking_equals_the_two_search_merge(backend, metric, filled, k):
    store = _store(backend, metric, filled=filled)
    queries = torch.from_numpy(_rand(50, 8, 3))
    ids, distances = store.search_torch(queries, k, by_magnitude=True)
    index = store._index
    merged_ids, merged_distances = merge_by_magnitude(
        index.search_torch(queries, k), index.search_torch(-queries, k)
    )
    np.testing.assert_array_equal(ids, merged_ids)
    # The merge recovers a negated query's distance as 1 - ((1 + s) - 1): the last bit may differ.
    np.testing.assert_allclose(distances, merged_distances, rtol=0, atol=1e-6)
    assert (ids >= 0).sum() == 50 * min(k, len(store))


def _independent_device_copies(store: KNNStore) -> None:
    """Give ``store`` device copies of its keys and values that share no memory with the host arrays (on
    the host, as a stand-in for a device), so that tests see whether writes reach them."""
    state = store.state()
    store._rows.mirror.keys = torch.from_numpy(state.keys.copy())
    store._rows.mirror.values = torch.from_numpy(state.values.copy())


def _assert_copies_match(store: KNNStore) -> None:
    live = store.live_ids()
    keys, values = store.get_tensors(live)
    expected_keys, expected_values = store.get(live)
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(values, expected_values)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_every_write_reaches_the_device_copies(value_dtype, tmp_path):
    store = KNNStore(8, 3, capacity=16, metric="cosine", value_dtype=value_dtype, index={"backend": "exact"})
    store.insert(_rand(6, 8, 0), _rand(6, 3, 1))
    store.save(tmp_path / "store")
    store = KNNStore.load(tmp_path / "store")  # holds only its 6 saved rows: the next insert grows it
    _independent_device_copies(store)
    store.insert(_rand(2, 8, 2), _rand(2, 3, 3))
    _assert_copies_match(store)
    _independent_device_copies(store)  # growing copied everything anew
    store.insert(_rand(12, 8, 4), _rand(12, 3, 5))  # fills, then evicts
    _assert_copies_match(store)
    store.update_values(np.array([0, 0, 5]), _rand(3, 3, 6))  # duplicate ids add up
    _assert_copies_match(store)
    ids = store.insert(_rand(2, 8, 7), _rand(2, 3, 8))
    assert store.recombine(ids[None], np.array([[0.0, 0.001]], np.float32), max_distance=0.01) == 1
    _assert_copies_match(store)
    store.cast_values("float16" if value_dtype == "float32" else "float32")
    _assert_copies_match(store)
    _independent_device_copies(store)
    store.update_values(np.array([2]), _rand(1, 3, 9))
    _assert_copies_match(store)


def test_a_store_on_the_host_keeps_no_copies_and_hnsw_stays_there():
    for backend in ("exact", "product", "hnsw"):
        store = _store(backend).to("cpu")
        assert store.device == torch.device("cpu") and not store._rows.mirror.active


@CUDA
@pytest.mark.parametrize("backend", ["exact", "product", "hnsw"])
def test_a_store_on_cuda_searches_and_reads_there(backend):
    store = _store(backend)
    queries = _rand(7, 8, 2)
    expected_ids, expected_distances = store.search(queries, 5, by_magnitude=True)
    expected_keys, expected_values = store.get(expected_ids[expected_ids >= 0])
    store.to("cuda")
    assert store.device.type == ("cpu" if backend == "hnsw" else "cuda")
    ids, distances = store.search_torch(torch.from_numpy(queries).cuda(), 5, by_magnitude=True)
    assert ids.device.type == "cuda" and distances.device.type == "cuda"
    np.testing.assert_array_equal(ids.cpu(), expected_ids)
    np.testing.assert_allclose(distances.cpu(), expected_distances, atol=1e-5)
    keys, values = store.get_tensors(expected_ids[expected_ids >= 0])
    assert keys.device == store.device
    np.testing.assert_array_equal(keys.cpu(), expected_keys)
    np.testing.assert_array_equal(values.cpu(), expected_values)
    if not store.keys_are_fixed:
        store.insert(_rand(2, 8, 5), _rand(2, 3, 6))
        store.update_values(store.live_ids()[:4], _rand(4, 3, 7))
        live = store.live_ids()
        np.testing.assert_array_equal(store.get_tensors(live)[1].cpu(), store.get(live)[1])
    assert store.to("cpu").device.type == "cpu" and not store._rows.mirror.active
