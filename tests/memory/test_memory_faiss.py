"""The faiss inverted-file index: exact until trained, exact again when every list is probed, evictions
removed by id, nprobe calibrated for recall, retrained as the store grows or its keys drift, and a store
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
from dmt.memory.faiss_ivf import FaissIndex, derived_nlist


def _same_as_exact(index: FaissIndex, exact: ExactIndex, queries: np.ndarray, k: int) -> None:
    ids, distances = index.search(queries, k)
    expected_ids, expected_distances = exact.search(queries, k)
    np.testing.assert_allclose(distances, expected_distances, atol=1e-4)
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(expected_ids, 1))


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_probing_every_list_is_exact_search_through_training_removals_and_re_adds(metric, small_training):
    index = FaissIndex(8, metric, 1000, nlist=8, nprobe=8)
    exact = ExactIndex(8, metric, 1000)
    queries = random_keys(20, 8, 9)
    for step, (begin, end) in enumerate([(0, 300), (300, 500), (500, 700)]):
        keys = random_keys(end - begin, 8, step)
        for target in (index, exact):
            target.add(np.arange(begin, end), keys)
        _same_as_exact(index, exact, queries, 7)
        assert index.trained == (end >= 400)  # exact search until 400 keys, then the lists
    removed = np.arange(0, 700, 3)
    for target in (index, exact):
        target.remove(removed)
    _same_as_exact(index, exact, queries, 7)
    assert not np.isin(index.search(queries, 7)[0], removed).any()
    re_added = np.arange(0, 200, 2)  # some removed, some live: every one gets a new key
    for target in (index, exact):
        target.add(re_added, random_keys(len(re_added), 8, 5))
    _same_as_exact(index, exact, queries, 7)
    ids = index.search(queries, 60)[0]
    assert all(len(set(row[row >= 0])) == len(row[row >= 0]) for row in ids)  # each label once
    assert index.filed_entries == len(exact)  # the lists hold every live key once, and no removed one


def test_ranking_by_magnitude_merges_the_searches_of_q_and_minus_q(small_training):
    index = FaissIndex(8, "ip", 600, nlist=4, nprobe=4)
    exact = ExactIndex(8, "ip", 600)
    keys = random_keys(500, 8, 1)
    for target in (index, exact):
        target.add(np.arange(500), keys)
    queries = random_keys(10, 8, 2)
    ids, distances = index.search_torch(torch.from_numpy(queries), 5, by_magnitude=True)
    expected_ids, expected_distances = exact.search_torch(torch.from_numpy(queries), 5, by_magnitude=True)
    np.testing.assert_array_equal(ids.numpy(), expected_ids.numpy())
    np.testing.assert_allclose(distances.numpy(), expected_distances.numpy(), atol=1e-5)


def test_nprobe_is_calibrated_on_the_first_queries_after_training(small_training):
    index = FaissIndex(16, "cosine", 4000)
    keys = clustered_keys(3000, 16, 0)
    index.add(np.arange(3000), keys)
    assert index.trained and index.nlist == derived_nlist(3000) == 32 and index.nprobe is None
    queries = clustered_keys(300, 16, 0)[::-1] + 0.05 * random_keys(300, 16, 3)
    found = index.search(queries, 8)[0]
    assert index.nprobe is not None and 1 <= index.nprobe < index.nlist
    assert index.calibrated_recall >= trained.CALIBRATION_RECALL
    exact = ExactIndex(16, "cosine", 4000)
    exact.add(np.arange(3000), keys)
    truth = exact.search(queries, 8)[0]
    recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(found, truth, strict=True)])
    assert recall >= 0.95
    # The smallest such nprobe: the same index visiting one list fewer misses that recall on these queries.
    if index.nprobe > 1:
        fewer = FaissIndex(16, "cosine", 4000, nprobe=index.nprobe - 1)
        fewer.add(np.arange(3000), keys)
        bound = exact.search(queries, 8)[1][:, -1:] + trained.TIE_TOLERANCE
        assert np.mean(fewer.search(queries, 8)[1] <= bound) < trained.CALIBRATION_RECALL
    # The settings as given (what rebuilds the index), not what was derived from them.
    assert index.params == {"backend": "faiss", "nlist": None, "nprobe": None}


def test_the_centroids_are_retrained_when_the_store_grows_or_its_keys_drift(small_training):
    index = FaissIndex(8, "l2", 10000)
    index.add(np.arange(400), clustered_keys(400, 8, 0))
    assert (index.trainings, index.trained_on, index.nlist) == (1, 400, derived_nlist(400))
    index.add(np.arange(400, 1500), clustered_keys(1100, 8, 0))
    assert index.trainings == 1  # grown less than 4 times
    index.add(np.arange(1500, 1600), clustered_keys(100, 8, 0))
    assert (index.trainings, index.trained_on) == (2, 1600)  # 4 x 400
    assert index.train_seconds > 0
    # The same number of keys, moved far from every centroid (a key projection that changed).
    for begin in range(0, 1600, 100):
        index.add(np.arange(begin, begin + 100), clustered_keys(100, 8, 0) + 20.0)
        if index.trainings == 3:
            break
    # Retrained for the drift before every key had moved, but not before a quarter of the store had.
    assert index.trainings == 3 and 300 <= begin < 1500
    assert index.added_since == 0


def test_a_faiss_store_evicts_exactly_and_restores_without_an_index_file(tmp_path: Path, small_training):
    store = KNNStore(8, 3, capacity=600, metric="cosine", index={"backend": "faiss", "nlist": 8, "nprobe": 8})
    store.insert(clustered_keys(600, 8, 0), random_keys(600, 3, 1))
    assert store.index_backend == "faiss" and len(store) == 600
    store.insert(
        clustered_keys(100, 8, 2), random_keys(100, 3, 3)
    )  # full: 100 evicted, exactly those removed
    assert len(store) == 600
    queries = random_keys(30, 8, 4)
    ids, distances = store.search(queries, k=5)
    assert store.recall(queries, k=5) == 1.0  # every list probed: exact
    store.save(tmp_path / "mem")
    assert not (tmp_path / "mem" / "index.bin").exists()  # rebuilt from the keys
    restored = KNNStore.load(tmp_path / "mem")
    assert restored.index_params == {"backend": "faiss", "nlist": 8, "nprobe": 8}
    again_ids, again_distances = restored.search(queries, k=5)
    np.testing.assert_array_equal(again_ids, ids)
    np.testing.assert_allclose(again_distances, distances, atol=1e-6)
    assert restored.recall(queries, k=5) == 1.0  # every list probed: exact


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nlist": 0}, "nlist must be an integer >= 1"),
        ({"nprobe": 2.5}, "nprobe must be an integer >= 1"),
        ({"nlist": 4, "nprobe": 8}, r"nprobe \(8\) exceeds nlist \(4\)"),
    ],
)
def test_bad_faiss_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        check_index_settings({"backend": "faiss", **settings}, 8, "ip", 1024)
    with pytest.raises(ValueError, match=message):
        make_index(8, "ip", 1024, backend="faiss", **settings)


def test_derived_lists_follow_four_root_n_with_enough_training_keys_each():
    assert [derived_nlist(n) for n in (400, 3000, 16384, 65536, 1048576)] == [16, 32, 256, 1024, 4096]
