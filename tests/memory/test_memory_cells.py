"""The product-cell index: exact within the probed cells, consistent through removals, re-adds and filing,
and a store backend that inserts, evicts and round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmt.memory import KNNStore
from dmt.memory import cells as cells_module
from dmt.memory.backends import check_index_settings, make_index
from dmt.memory.cells import CellIndex, derived_cells_per_half
from dmt.memory.exact import ExactIndex


def _rand(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _same_as_exact(index: CellIndex, exact: ExactIndex, queries: np.ndarray, k: int) -> None:
    ids, distances = index.search(queries, k)
    expected_ids, expected_distances = exact.search(queries, k)
    np.testing.assert_allclose(distances, expected_distances, atol=1e-5)
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(expected_ids, 1))


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_probing_every_cell_is_exact_search_through_removals_and_re_adds(metric, monkeypatch):
    monkeypatch.setattr(cells_module, "PENDING_MIN", 250)  # files the first add only
    index = CellIndex(8, metric, 600, cells_per_half=4, probe_cells=16)
    exact = ExactIndex(8, metric, 600)
    queries = _rand(20, 8, 9)
    for step, (begin, end) in enumerate([(0, 300), (300, 360), (360, 500)]):
        keys = _rand(end - begin, 8, step)
        for target in (index, exact):
            target.add(np.arange(begin, end), keys)
        _same_as_exact(index, exact, queries, 7)
    assert 0 < len(index.pending) < 500  # some labels filed, some pending
    removed = np.arange(0, 500, 3)
    for target in (index, exact):
        target.remove(removed)
    _same_as_exact(index, exact, queries, 7)
    assert not np.isin(index.search(queries, 7)[0], removed).any()
    re_added = np.arange(0, 200, 2)  # some removed, some live: every one gets a new key
    for target in (index, exact):
        target.add(re_added, _rand(len(re_added), 8, 5))
    _same_as_exact(index, exact, queries, 7)
    index.file_pending()
    assert len(index.pending) == 0
    _same_as_exact(index, exact, queries, 7)
    ids = index.search(queries, 50)[0]
    assert all(len(set(row[row >= 0])) == len(row[row >= 0]) for row in ids)  # each label once


def test_few_probed_cells_find_the_neighbours_of_queries_near_stored_keys():
    # Clustered keys, as a trained projection makes them (iid Gaussian keys have no near neighbours to
    # find: their true neighbours lie in many cells).
    centres = _rand(500, 16, 0)
    keys = centres[np.arange(20000) % 500] + 0.2 * _rand(20000, 16, 3)
    index = CellIndex(16, "cosine", 20000, probe_cells=8)
    index.add(np.arange(20000), keys)
    index.file_pending()
    assert index.n == derived_cells_per_half(20000) == 32
    queries = keys[:200] + 0.05 * _rand(200, 16, 1)
    exact = ExactIndex(16, "cosine", 20000)
    exact.add(np.arange(20000), keys)
    ids, expected = index.search(queries, 4)[0], exact.search(queries, 4)[0]
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(ids, expected, strict=True)])
    assert recall >= 0.95
    assert (ids[:, 0] == np.arange(200)).mean() >= 0.99  # the key each query was made from, first


def test_search_pads_and_searches_tensors_without_numpy(numpy_conversions):
    index = CellIndex(4, "ip", 64, cells_per_half=2, probe_cells=4)
    assert index.search(_rand(2, 4, 0), 3)[0].tolist() == [[-1] * 3] * 2  # empty
    index.add(np.array([5, 9]), _rand(2, 4, 1))
    ids, distances = index.search(_rand(3, 4, 2), 3)
    assert (ids[:, 2] == -1).all() and np.isinf(distances[:, 2]).all() and set(ids[:, :2].ravel()) == {5, 9}
    numpy_conversions.clear()
    found, _ = index.search_torch(torch.from_numpy(_rand(3, 4, 2)), 3)
    assert numpy_conversions == [] and found.tolist() == ids.tolist()


@pytest.mark.parametrize(
    ("dim", "metric", "settings", "message"),
    [
        (8, "l2", {}, "needs metric ip or cosine"),
        (7, "ip", {}, "needs an even key dim"),
        (8, "ip", {"cells_per_half": 2, "probe_cells": 5}, r"probe_cells \(5\) exceeds the 4 cells"),
        (8, "ip", {"probe_cells": 0}, "probe_cells must be an integer >= 1"),
        (8, "ip", {"cells_per_half": 1.5}, "cells_per_half must be an integer >= 1"),
    ],
)
def test_settings_that_cannot_work_are_named(dim, metric, settings, message):
    with pytest.raises(ValueError, match=message):
        check_index_settings({"backend": "cells", **settings}, dim, metric, 1024)
    with pytest.raises(ValueError, match=message):
        make_index(dim, metric, 1024, backend="cells", **settings)


def test_ranking_by_magnitude_is_refused():
    index = CellIndex(4, "ip", 16)
    with pytest.raises(ValueError, match=r"ranks by q·k only"):
        index.search_torch(torch.zeros(1, 4), 2, by_magnitude=True)


def test_each_backend_reads_only_its_own_settings():
    index = make_index(8, "ip", 4096, backend="cells", probe_cells=9, ef_search=10, M=8)
    assert index.params == {"backend": "cells", "cells_per_half": 16, "probe_cells": 9}
    assert make_index(8, "ip", 4096, backend="hnsw", probe_cells=9).params["M"] == 16


def _cells_store() -> KNNStore:
    index = {"backend": "cells", "cells_per_half": 4, "probe_cells": 6}
    return KNNStore(8, 3, capacity=64, metric="cosine", index=index, value_dtype="float16")


def test_a_cells_store_evicts_when_full_and_restores_the_same_store(tmp_path: Path):
    store = _cells_store()
    store.insert(_rand(64, 8, 0), _rand(64, 3, 1))
    ids, _ = store.search(_rand(10, 8, 2), 4)
    store.reference(ids)
    store.insert(_rand(16, 8, 3), _rand(16, 3, 4))  # full: evicts 16 victims
    assert len(store) == 64 and store.stats.evictions == 16
    store.save(tmp_path / "mem")
    assert not (tmp_path / "mem" / "index.bin").exists()  # rebuilt from the keys
    queries = _rand(12, 8, 5)
    expected = store.search(queries, 5)
    for restored in (KNNStore.load(tmp_path / "mem"), KNNStore.from_state_dict(store.state_dict())):
        assert restored.index_params == store.index_params
        found = restored.search(queries, 5)
        np.testing.assert_array_equal(found[0], expected[0])
        np.testing.assert_allclose(found[1], expected[1], atol=1e-6)
