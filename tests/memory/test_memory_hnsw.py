"""HnswIndex: agreement with brute force, padding, deletion/update semantics, persistence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import dmt
from dmt.memory import METRICS
from dmt.memory.hnsw import HnswIndex, derived_ef
from dmt.memory.metrics import pairwise_distance_np


def _data(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)


def _brute_force(queries: np.ndarray, keys: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    dist = pairwise_distance_np(queries.astype(np.float64), keys.astype(np.float64), metric)  # (N, M)
    ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(dist, ids, axis=1)


@pytest.mark.parametrize("metric", METRICS)
def test_search_agrees_with_brute_force(metric: str) -> None:
    keys, queries, k = _data(400, 16, seed=0), _data(50, 16, seed=1), 10
    index = HnswIndex(16, metric, capacity=400)
    index.add(np.arange(400), keys)
    labels, distances = index.search(queries, k)
    assert labels.dtype == np.int64 and distances.dtype == np.float32
    expected, _ = _brute_force(queries, keys, k, metric)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(labels, expected, strict=True)])
    assert recall >= 0.95
    # The reported distances are the metric of dmt.memory.metrics between the query and that key.
    exact = np.take_along_axis(pairwise_distance_np(queries, keys, metric), labels, axis=1)
    np.testing.assert_allclose(distances, exact, atol=1e-4)
    assert (np.diff(distances, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_tiny_index_is_exact(metric: str) -> None:
    keys, queries = _data(20, 8, seed=2), _data(10, 8, seed=3)
    index = HnswIndex(8, metric, capacity=32)
    index.add(np.arange(5, 25), keys)  # labels need not start at 0
    labels, distances = index.search(queries, 6)
    expected, expected_dist = _brute_force(queries, keys, 6, metric)
    np.testing.assert_array_equal(labels, expected + 5)
    np.testing.assert_allclose(distances, expected_dist, atol=1e-4)


def test_search_pads_when_fewer_than_k_live() -> None:
    index = HnswIndex(4, "l2", capacity=10)
    labels, distances = index.search(_data(2, 4, seed=0), 3)
    assert (labels == -1).all() and np.isinf(distances).all()
    index.add(np.array([3, 7]), _data(2, 4, seed=1))
    index.remove(np.array([7]))
    labels, distances = index.search(_data(2, 4, seed=2), 3)
    np.testing.assert_array_equal(labels, [[3, -1, -1], [3, -1, -1]])
    assert np.isfinite(distances[:, 0]).all() and np.isinf(distances[:, 1:]).all()
    assert index.search(np.empty((0, 4), dtype=np.float32), 3)[0].shape == (0, 3)


def test_search_survives_unreachable_points() -> None:
    # A sparse graph (M=2) with 99.5% of it deleted: one live point has no path from the entry point,
    # so hnswlib itself raises for k = live count even with ef covering the whole graph.
    n, live = 1000, 5
    rng = np.random.default_rng(2)
    index = HnswIndex(8, "l2", capacity=n, M=2, ef_construction=10, num_threads=1)
    index.add(np.arange(n), rng.standard_normal((n, 8)).astype(np.float32))
    index.remove(np.arange(live, n))
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        index._knn(queries, live, ef=n)  # precondition: the raw hnswlib call fails
    labels, distances = index.search(queries, 8)
    found = labels >= 0
    assert found.sum(1).min() >= live - 1 and found[:, live:].sum() == 0
    assert set(labels[found].tolist()) <= set(range(live))
    assert np.isinf(distances[~found]).all()
    np.testing.assert_array_equal(np.sort(distances, axis=1), distances)


def test_remove_is_idempotent_and_readd_updates_in_place() -> None:
    index = HnswIndex(4, "ip", capacity=8, num_threads=1)
    index.add(np.arange(4), np.eye(4, dtype=np.float32))
    index.remove(np.array([1, 1, -1, 6]))  # duplicates, -1 and absent labels are ignored
    index.remove(np.array([1]))
    assert len(index) == 3
    index.add(np.array([1]), np.array([[0.0, 0.0, 0.0, 2.0]], dtype=np.float32))
    assert len(index) == 4
    labels, distances = index.search(np.array([[0.0, 0.0, 0.0, 1.0]], dtype=np.float32), 1)
    assert labels[0, 0] == 1 and distances[0, 0] == pytest.approx(-1.0)
    assert index._index.element_count == 4  # updated in place, not appended
    with pytest.raises(ValueError, match="distinct"):
        index.add(np.array([2, 2]), np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="labels"):
        index.add(np.array([8]), np.ones((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="vectors"):
        index.add(np.array([2]), np.ones((1, 5), dtype=np.float32))


def test_load_refuses_a_live_mask_naming_labels_not_in_the_file(tmp_path: Path) -> None:
    # The round trip itself is tested for every backend in test_memory_backends.py.
    index = HnswIndex(8, "cosine", capacity=50)
    index.add(np.arange(40), _data(40, 8, seed=4))
    index.save(tmp_path / "index.bin")
    live = np.zeros(50, dtype=bool)
    live[[3, 45]] = True
    with pytest.raises(ValueError, match="not in the index file"):
        HnswIndex.load(tmp_path / "index.bin", 8, "cosine", 50, live)


def test_hnswlib_is_imported_only_in_hnsw_module() -> None:
    package = Path(dmt.__file__).parent
    pattern = re.compile(r"^\s*(import hnswlib|from hnswlib\b)", re.MULTILINE)
    importers = [
        p.relative_to(package).as_posix() for p in package.rglob("*.py") if pattern.search(p.read_text())
    ]
    assert importers == ["memory/hnsw.py"]


# Smallest ef measured for recall@k >= 0.97 on iid Gaussian 64-d keys (the hardest measured case, see
# derived_ef), by store size and k.
MEASURED_EF = {10_000: {16: 188, 32: 212, 64: 252}, 100_000: {16: 768, 32: 944, 64: 1152}}


def test_derived_ef_covers_the_measurements_with_margin() -> None:
    for size, needs in MEASURED_EF.items():
        for k, need in needs.items():
            assert derived_ef(k, size) >= 1.5 * need
    assert derived_ef(16, 10_000) == 16 + 399  # k + ⌈size^0.65⌉
    assert derived_ef(6, 8) == 8  # at most the size ...
    assert derived_ef(10, 5) == 10  # ... but never below k


def test_ef_search_none_is_derived_per_search_and_an_integer_still_works(tmp_path: Path) -> None:
    index = HnswIndex(8, "l2", capacity=100, num_threads=1)
    assert index.ef_search is None and index.params["ef_search"] is None  # the default
    index.add(np.arange(60), _data(60, 8, seed=5))
    index.remove(np.arange(20))
    used: list[int] = []
    knn = index._knn
    index._knn = lambda queries, k, ef: used.append(ef) or knn(queries, k, ef)  # type: ignore[method-assign]
    index.search(_data(3, 8, seed=6), 5)
    assert used == [derived_ef(5, 40)]  # from k and the live size
    index.save(tmp_path / "index.bin")
    live = np.zeros(100, dtype=bool)
    live[20:60] = True
    assert HnswIndex.load(tmp_path / "index.bin", 8, "l2", 100, live, ef_search=None).ef_search is None
    index.set_ef(3)
    assert (index.ef(5), index.ef(2), index.params["ef_search"]) == (5, 3, 3)  # explicit, raised to k
    for bad in (0, -4, True, 2.5, "64"):
        with pytest.raises(ValueError, match="ef_search must be an integer >= 1 or None"):
            index.set_ef(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ef_search"):
        HnswIndex(8, "l2", capacity=10, ef_search=0)
