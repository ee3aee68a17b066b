"""The ScaNN index: exact until trained, exact distances for what it returns, evictions deleted by slot
(ScaNN renumbers on delete), breadth calibrated for recall, retrained as the store grows, and a store
backend that inserts, evicts and round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clustered_keys, random_keys

from dmt.memory import KNNStore, trained
from dmt.memory.backends import check_index_settings, make_index
from dmt.memory.exact import ExactIndex
from dmt.memory.scann_index import ScannIndex, derived_leaves


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_what_it_returns_is_live_exact_and_near_through_training_removals_and_re_adds(metric, small_training):
    index = ScannIndex(8, metric, 1000, leaves=8, leaves_to_search=8)
    exact = ExactIndex(8, metric, 1000)
    queries = clustered_keys(40, 8, 9)

    def check() -> None:
        ids, distances = index.search(queries, 7)
        truth, truth_distances = exact.search(queries, 7)
        assert all(len(set(row)) == len(row) for row in ids)  # each label once
        assert np.isin(ids, np.flatnonzero(exact._live)).all()  # live labels only
        # Re-ranked exactly: each returned label's distance is its exact one, in ascending order.
        all_ids, all_distances = exact.search(queries, len(exact))
        for row, found, known, known_distances in zip(distances, ids, all_ids, all_distances, strict=True):
            where = {label: d for label, d in zip(known, known_distances, strict=True)}
            np.testing.assert_allclose(row, [where[label] for label in found], atol=1e-4)
            assert (np.diff(row) >= -1e-6).all()
        assert _recall(ids, truth) >= 0.9
        np.testing.assert_allclose(distances[:, 0], truth_distances[:, 0], atol=1e-4)

    for step, (begin, end) in enumerate([(0, 300), (300, 500), (500, 700)]):
        keys = clustered_keys(end - begin, 8, step)
        for target in (index, exact):
            target.add(np.arange(begin, end), keys)
        check()
        assert index.trained == (end >= 400)  # exact search until 400 keys, then the tree
    removed = np.arange(0, 700, 3)
    for target in (index, exact):
        target.remove(removed)
    check()
    re_added = np.arange(0, 200, 2)  # some removed, some live: every one gets a new key
    for target in (index, exact):
        target.add(re_added, clustered_keys(len(re_added), 8, 5))
    check()
    assert index.filed_entries == len(exact)  # every live key filed once, and no removed one
    assert sorted(index._label_at[: index.filed_entries]) == list(np.flatnonzero(exact._live))


def test_ranking_by_magnitude_merges_the_searches_of_q_and_minus_q(small_training):
    index = ScannIndex(8, "ip", 600, leaves=4, leaves_to_search=4)
    exact = ExactIndex(8, "ip", 600)
    keys = random_keys(500, 8, 1)
    for target in (index, exact):
        target.add(np.arange(500), keys)
    queries = torch.from_numpy(random_keys(10, 8, 2))
    ids, distances = index.search_torch(queries, 5, by_magnitude=True)
    expected_ids, expected_distances = exact.search_torch(queries, 5, by_magnitude=True)
    assert _recall(ids.numpy(), expected_ids.numpy()) >= 0.9
    np.testing.assert_allclose(distances[:, 0].numpy(), expected_distances[:, 0].numpy(), atol=1e-5)


def test_the_breadth_is_calibrated_on_the_first_queries_after_training(small_training):
    index = ScannIndex(16, "cosine", 4000)
    keys = clustered_keys(3000, 16, 0)
    index.add(np.arange(3000), keys)
    assert index.trained and index.search_state["leaves"] == derived_leaves(3000) == 32
    assert index.leaves_to_search is None
    queries = clustered_keys(300, 16, 0)[::-1] + 0.05 * random_keys(300, 16, 3)
    found = index.search(queries, 8)[0]
    assert index.leaves_to_search is not None and 1 <= index.leaves_to_search < 32
    assert index.calibrated_recall >= trained.CALIBRATION_RECALL
    exact = ExactIndex(16, "cosine", 4000)
    exact.add(np.arange(3000), keys)
    assert _recall(found, exact.search(queries, 8)[0]) >= 0.95
    # The settings as given (what rebuilds the index), not what was derived from them.
    assert index.params == {"backend": "scann", "leaves": None, "leaves_to_search": None}


def test_the_tree_is_retrained_when_the_store_grows(small_training):
    index = ScannIndex(8, "l2", 10000)
    index.add(np.arange(400), clustered_keys(400, 8, 0))
    assert (index.trainings, index.trained_on) == (1, 400)
    index.add(np.arange(400, 1500), clustered_keys(1100, 8, 0))
    assert index.trainings == 1  # grown less than 4 times
    index.add(np.arange(1500, 1600), clustered_keys(100, 8, 0))
    assert (index.trainings, index.trained_on, index.filed_entries) == (2, 1600, 1600)
    assert index.train_seconds > 0


def test_a_full_store_is_retrained_once_half_its_keys_were_replaced(small_training):
    index = ScannIndex(8, "l2", 400)
    index.add(np.arange(400), clustered_keys(400, 8, 0))
    replaced = clustered_keys(200, 8, 1)
    index.remove(np.arange(199))
    index.add(np.arange(199), replaced[:199])
    assert (index.trainings, index.removed_since) == (1, 199)  # a store that never grows
    index.remove(np.arange(199, 200))
    index.add(np.arange(199, 200), replaced[199:])
    assert (index.trainings, index.trained_on, index.removed_since) == (2, 400, 0)
    found, _ = index.search(replaced[:50], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(50))  # the replaced keys are found where they are


def test_a_scann_store_evicts_exactly_and_restores_without_an_index_file(tmp_path: Path, small_training):
    index = {"backend": "scann", "leaves": 8, "leaves_to_search": 8}
    store = KNNStore(8, 3, capacity=600, metric="cosine", index=index)
    store.insert(clustered_keys(600, 8, 0), random_keys(600, 3, 1))
    assert store.index_backend == "scann" and len(store) == 600
    store.insert(
        clustered_keys(100, 8, 2), random_keys(100, 3, 3)
    )  # full: 100 evicted, exactly those deleted
    assert len(store) == 600
    queries = clustered_keys(30, 8, 4)
    ids, distances = store.search(queries, k=5)
    assert store.recall(queries, k=5) >= 0.9
    store.save(tmp_path / "mem")
    assert not (tmp_path / "mem" / "index.bin").exists()  # rebuilt from the keys
    restored = KNNStore.load(tmp_path / "mem")
    assert restored.index_params == index
    again_ids, again_distances = restored.search(queries, k=5)
    np.testing.assert_allclose(again_distances[:, 0], distances[:, 0], atol=1e-5)
    assert _recall(again_ids, ids) >= 0.9


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"leaves": 0}, "leaves must be an integer >= 1"),
        ({"leaves_to_search": 2.5}, "leaves_to_search must be an integer >= 1"),
        ({"leaves": 4, "leaves_to_search": 8}, r"leaves_to_search \(8\) exceeds leaves \(4\)"),
    ],
)
def test_bad_scann_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        check_index_settings({"backend": "scann", **settings}, 8, "ip", 1024)
    with pytest.raises(ValueError, match=message):
        make_index(8, "ip", 1024, backend="scann", **settings)


def test_derived_leaves_follow_two_root_n_with_enough_training_keys_each():
    assert [derived_leaves(n) for n in (400, 3000, 16384, 65536, 1048576)] == [16, 32, 256, 512, 2048]
