"""Key index backends: the exact index, the ``auto`` choice, and stores on either backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmt.memory import METRICS, KNNStore
from dmt.memory.backends import EXACT_MAX_WORK, load_index, make_index, resolve_backend
from dmt.memory.exact import ExactIndex
from dmt.memory.metrics import pairwise_distance_np


def _data(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_index_returns_the_true_neighbours(metric: str) -> None:
    keys, queries, k = _data(3000, 16, seed=0), _data(70, 16, seed=1), 12
    index = ExactIndex(16, metric, capacity=4000)
    index.add(np.arange(500, 3500), keys)  # labels need not start at 0
    index.remove(np.arange(500, 1000))  # removed labels are never returned
    labels, distances = index.search(queries, k)
    all_distances = pairwise_distance_np(queries.astype(np.float64), keys[500:].astype(np.float64), metric)
    expected = np.sort(all_distances, axis=1)[:, :k]
    np.testing.assert_allclose(distances, expected, atol=1e-4)
    assert labels.min() >= 1000 and labels.dtype == np.int64 and distances.dtype == np.float32
    reported = np.take_along_axis(pairwise_distance_np(queries, keys, metric), labels - 500, axis=1)
    np.testing.assert_allclose(distances, reported, atol=1e-4)


def test_exact_index_blocks_queries_without_changing_results() -> None:
    keys, queries = _data(64, 8, seed=2), _data(33, 8, seed=3)
    index = ExactIndex(8, "l2", capacity=64)
    index.add(np.arange(64), keys)
    whole = index.search(queries, 5)
    index.block_elements = 64 * 4  # 4 queries per block
    labels, distances = index.search(queries, 5)
    np.testing.assert_array_equal(labels, whole[0])
    np.testing.assert_allclose(distances, whole[1], rtol=1e-6)  # matmul blocking may move the last bit


def test_exact_index_pads_and_overwrites() -> None:
    index = ExactIndex(4, "ip", capacity=8)
    labels, distances = index.search(_data(2, 4, seed=0), 3)
    assert (labels == -1).all() and np.isinf(distances).all()
    index.add(np.arange(4), np.eye(4, dtype=np.float32))
    index.remove(np.array([1, 1, -1, 6]))
    assert len(index) == 3
    index.add(np.array([1]), np.array([[0.0, 0.0, 0.0, 2.0]], dtype=np.float32))
    labels, distances = index.search(np.array([[0.0, 0.0, 0.0, 1.0]], dtype=np.float32), 6)
    np.testing.assert_array_equal(labels[0, :2], [1, 3])
    assert distances[0, 0] == pytest.approx(-1.0) and (labels[0, 4:] == -1).all()
    with pytest.raises(ValueError, match="distinct"):
        index.add(np.array([2, 2]), np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="labels"):
        index.add(np.array([8]), np.ones((1, 4), dtype=np.float32))


def test_exact_index_scans_and_holds_only_up_to_its_highest_live_label() -> None:
    rng = np.random.default_rng(2)
    index = ExactIndex(dim=8, metric="ip", capacity=1_000_000)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    index.add(np.arange(300), vectors)
    assert len(index._table) < 2048  # grown with the labels, not allocated at capacity
    index.remove(np.array([299, 298, 10]))
    assert index._rows == 298  # the hole at 10 stays within the scanned rows, the top two leave them
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    labels, _ = index.search(queries, k=4)
    live = np.setdiff1d(np.arange(298), [10])
    exact = live[np.argsort(pairwise_distance_np(queries, vectors[live], "ip"), axis=1)[:, :4]]
    np.testing.assert_array_equal(labels, exact)
    index.add(np.array([5000]), vectors[:1])
    assert index._rows == 5001 and index.search(vectors[:1], k=1)[0][0, 0] in (0, 5000)


def test_hnsw_index_save_load_and_bytes_round_trip(tmp_path: Path) -> None:
    index = make_index(8, "cosine", 50, backend="hnsw", ef_search=32)
    assert index.backend == "hnsw" and index.params["backend"] == "hnsw" and index.has_file
    index.add(np.arange(40), _data(40, 8, seed=4))
    index.remove(np.arange(10))
    live = np.zeros(50, dtype=bool)
    live[10:40] = True
    queries = _data(5, 8, seed=5)
    expected = index.search(queries, 5)
    index.save(tmp_path / "index.bin")
    for restored in (
        load_index(tmp_path / "index.bin", 8, "cosine", 50, live, **index.params),
        load_index(index.to_bytes(), 8, "cosine", 50, live, **index.params),
    ):
        assert type(restored) is type(index) and len(restored) == 30
        for got, want in zip(restored.search(queries, 5), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_exact_index_has_no_file(tmp_path: Path) -> None:
    index = make_index(8, "l2", 10, backend="exact")
    assert not index.has_file
    with pytest.raises(NotImplementedError, match="the exact index has no file"):
        index.save(tmp_path / "index.bin")


def test_auto_takes_exact_for_small_stores_only() -> None:
    assert resolve_backend("auto", dim=64, capacity=EXACT_MAX_WORK // 64) == "exact"
    assert resolve_backend("auto", dim=64, capacity=EXACT_MAX_WORK // 64 + 1) == "faiss"
    assert resolve_backend("hnsw", dim=8, capacity=10) == "hnsw"
    with pytest.raises(ValueError, match="unknown index backend 'usearch'"):
        make_index(8, "l2", 10, backend="usearch")
    with pytest.raises(ValueError, match=r"unknown index setting\(s\) \['ef'\]"):
        make_index(8, "l2", 10, ef=3)


def test_exact_store_churns_saves_and_matches_brute_force(tmp_path: Path) -> None:
    store = KNNStore(8, 3, capacity=100, metric="l2", index={"backend": "exact"})
    assert store.index_backend == "exact"
    for seed in range(5):  # 250 inserts into 100 slots: evictions overwrite index rows
        store.insert(_data(50, 8, seed=seed), _data(50, 3, seed=seed + 10))
    assert len(store) == 100 and store.stats.evictions == 150
    queries = _data(9, 8, seed=20)
    ids, distances = store.search(queries, 7)
    keys, _ = store.get(np.arange(100))
    np.testing.assert_allclose(
        distances, np.sort(pairwise_distance_np(queries, keys, "l2"), axis=1)[:, :7], atol=1e-5
    )
    store.save(tmp_path / "store")
    assert not (tmp_path / "store" / "index.bin").exists()  # rebuilt from the keys on loading
    restored = KNNStore.load(tmp_path / "store")
    assert restored.index_backend == "exact"
    assert "index_bytes" not in store.state_dict()
    np.testing.assert_array_equal(restored.search(queries, 7)[0], ids)
    np.testing.assert_array_equal(KNNStore.from_state_dict(store.state_dict()).search(queries, 7)[0], ids)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_product_keys_are_searched_exactly(metric: str) -> None:
    index = make_index(8, metric, 400, backend="product")  # 20 × 20 sub-key pairs
    assert index.keys_are_fixed and len(index) == 400
    keys = index.keys(np.arange(400))
    assert len(np.unique(keys, axis=0)) == 400
    queries = _data(30, 8, seed=6) * 3
    for k in (1, 7, 25):  # 25 > n: more neighbours than sub-keys per half
        labels, distances = index.search(queries, k)
        exact = pairwise_distance_np(queries, keys, metric)
        np.testing.assert_allclose(distances, np.sort(exact, axis=1)[:, :k], atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(exact, labels, axis=1), distances, atol=1e-5)


def test_product_key_store_is_full_learns_values_and_round_trips(tmp_path: Path) -> None:
    store = KNNStore(8, 2, capacity=64, metric="ip", index={"backend": "product"})
    assert len(store) == 64 and store.index_backend == "product"
    store.update_values(np.array([3, 5]), np.ones((2, 2), dtype=np.float32))
    ids, _ = store.search(_data(4, 8, seed=7), 5)
    with pytest.raises(ValueError, match="cannot insert: this store's keys are fixed by its product index"):
        store.insert(_data(1, 8, seed=8), np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="cannot recombine"):
        store.recombine(ids, np.zeros(ids.shape, dtype=np.float32), 1.0)
    store.save(tmp_path / "store")
    restored = KNNStore.load(tmp_path / "store")
    np.testing.assert_array_equal(restored.get(np.array([3, 5]))[1], np.ones((2, 2)))
    np.testing.assert_array_equal(restored.search(_data(4, 8, seed=7), 5)[0], ids)


@pytest.mark.parametrize(
    ("dim", "metric", "capacity", "message"),
    [
        (8, "cosine", 64, "metric ip or l2"),
        (7, "ip", 64, "even key dim"),
        (8, "ip", 60, r"capacity = n² \(e.g. 49 or 64\), got 60"),
    ],
)
def test_product_key_index_rejects_what_it_cannot_search(
    dim: int, metric: str, capacity: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_index(dim, metric, capacity, backend="product")
