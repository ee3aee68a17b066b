"""KNNStore: validation, cold start, capacity/eviction (LRFU, FIFO, random), insertion times, the clock,
value updates, recombination, per-entry reads and origins, and recall against exact search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmt.memory import ORIGIN_SPAN, KNNStore, MemoryStats, token_spans
from dmt.memory.store import EVICTIONS


def _rand(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _search_and_reference(store: KNNStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`KNNStore.search`, then its ``(N, k)`` ids referenced (as a memory layer does)."""
    ids, distances = store.search(queries, k)
    store.reference(ids)
    return ids, distances


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"capacity": 0}, "capacity"),
        ({"key_dim": 0}, "key_dim"),
        ({"value_dim": -1}, "value_dim"),
        ({"metric": "hamming"}, "metric"),
        ({"lrfu_lambda": 1.5}, "lrfu_lambda"),
        ({"value_dtype": "int8"}, "value_dtype"),
        ({"eviction": "lifo"}, r"eviction must be one of lrfu, fifo, random, got 'lifo'"),
    ],
)
def test_constructor_validation_names_argument(kwargs: dict, name: str) -> None:
    args = {"key_dim": 4, "value_dim": 3, "capacity": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        KNNStore(**args)


def test_cold_start_and_search_validation() -> None:
    store = KNNStore(4, 3, capacity=10)
    ids, distances = store.search(_rand(2, 4, 0), k=5)
    assert ids.shape == distances.shape == (2, 5)
    assert ids.dtype == np.int64 and distances.dtype == np.float32
    assert (ids == -1).all() and np.isinf(distances).all()
    keys, values = store.get(ids[ids >= 0])  # nothing found: nothing to read
    assert keys.shape == (0, 4) and values.shape == (0, 3)
    assert keys.dtype == values.dtype == np.float32
    assert store.now == 0 and store.stats == MemoryStats(entries=0, queries=2)  # searching: no tick
    with pytest.raises(ValueError, match=r"k=11.*capacity=10|capacity=10.*k=11"):
        store.search(_rand(1, 4, 0), k=11)
    with pytest.raises(ValueError, match=r"queries must have shape \(N, 4\)"):
        store.search(_rand(2, 5, 0), k=1)
    with pytest.raises(ValueError, match="floating-point"):
        store.search(np.ones((2, 4), dtype=np.int64), k=1)
    bad = _rand(2, 4, 0)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.search(bad, k=1)


def test_insert_validation() -> None:
    store = KNNStore(4, 3, capacity=10, value_dtype="float16")
    with pytest.raises(ValueError, match="values"):
        store.insert(_rand(2, 4, 0), _rand(2, 2, 0))
    with pytest.raises(ValueError, match="2 keys but 3 values"):
        store.insert(_rand(2, 4, 0), _rand(3, 3, 0))
    with pytest.raises(ValueError, match="float16"):  # 1e6 overflows float16 to inf
        store.insert(_rand(1, 4, 0), np.full((1, 3), 1e6))
    ids = store.insert(_rand(2, 4, 0).astype(np.float64), _rand(2, 3, 1).astype(np.float16))
    np.testing.assert_array_equal(ids, [0, 1])
    assert store.get(ids)[1].dtype == np.float32


def test_search_returns_stored_entries() -> None:
    store = KNNStore(8, 3, capacity=50, metric="l2")
    keys, values = _rand(30, 8, 0), _rand(30, 3, 1)
    ids = store.insert(keys, values)
    found, distances = store.search(keys[:5], k=3)
    np.testing.assert_array_equal(found[:, 0], ids[:5])  # each key is its own nearest neighbour
    np.testing.assert_allclose(distances[:, 0], 0.0, atol=1e-5)
    got_keys, got_values = store.get(found[:, 0])
    np.testing.assert_array_equal(got_keys, keys[:5])
    np.testing.assert_array_equal(got_values, values[:5])
    # The second neighbours read back are the entries their distances describe (squared l2).
    second_keys, second_values = store.get(found[:, 1])
    np.testing.assert_allclose(((second_keys - keys[:5]) ** 2).sum(1), distances[:, 1], rtol=1e-5)
    np.testing.assert_array_equal(second_values, values[found[:, 1]])  # slots = rows: filled in order


def test_capacity_never_exceeded_and_evicted_entries_are_gone() -> None:
    store = KNNStore(16, 4, capacity=500, metric="l2", index={"num_threads": 1})
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((97, 16)).astype(np.float32) for _ in range(30)]
    stored_ids = []
    for i, keys in enumerate(batches):
        stored_ids.append(store.insert(keys, np.full((97, 4), i, dtype=np.float32)))
        assert len(store) <= 500 and len(store._index) == len(store)
        _search_and_reference(store, keys[:3], k=4)
    stats = store.stats
    assert stats == MemoryStats(
        entries=500, inserts=30 * 97, evictions=30 * 97 - 500, queries=90, merges=0, reads=90 * 4
    )
    assert store.now == 90  # one tick per query referenced
    all_keys = np.concatenate(batches)
    all_ids = np.concatenate(stored_ids)
    # A slot holds the latest key written to it; every older key written there has been evicted.
    latest = {slot: row for row, slot in enumerate(all_ids)}
    evicted = np.array([row for row, slot in enumerate(all_ids) if latest[slot] != row])
    assert len(evicted) == stats.evictions
    _, distances = store.search(all_keys[evicted], k=1)
    assert (distances[:, 0] > 1e-3).all()  # no exact match survives for an evicted key


def test_lrfu_keeps_frequently_referenced_entries() -> None:
    store = KNNStore(8, 2, capacity=100, metric="l2", lrfu_lambda=0.1)
    keys = _rand(100, 8, 0)
    ids = store.insert(keys, _rand(100, 2, 1))
    hot = ids[:20]
    for _ in range(5):
        _search_and_reference(store, keys[:20], k=1)
    store.search(keys[60:], k=1)  # looked at but not referenced: no protection
    new_ids = store.insert(_rand(50, 8, 2), _rand(50, 2, 3))
    assert store.stats.evictions == 50 and len(store) == 100
    assert not np.isin(hot, new_ids).any()  # every hot slot survived
    np.testing.assert_array_equal(store.search(keys[:20], k=1)[0][:, 0], hot)


def test_insert_more_than_capacity_keeps_last_rows() -> None:
    store = KNNStore(4, 1, capacity=5)
    keys = _rand(8, 4, 0)
    ids = store.insert(keys, np.arange(8, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(ids[:3], -1)
    assert sorted(ids[3:].tolist()) == list(range(5))
    np.testing.assert_array_equal(store.get(ids[3:])[1][:, 0], np.arange(3, 8))
    assert store.stats.inserts == 5 and len(store) == 5


def test_update_values_accumulates_duplicates() -> None:
    store = KNNStore(4, 2, capacity=10, value_dtype="float16")
    ids = store.insert(_rand(3, 4, 0), np.zeros((3, 2), dtype=np.float32))
    store.update_values(
        np.array([ids[0], ids[2], ids[0], -1, ids[0]]),
        np.array([[1.0, 2.0], [0.5, 0.5], [1.0, 2.0], [9.0, 9.0], [1.0, 2.0]], dtype=np.float32),
    )
    np.testing.assert_array_equal(store.get(ids)[1], [[3.0, 6.0], [0.0, 0.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match="ids"):
        store.update_values(np.array([10]), np.ones((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="live"):
        store.get(np.array([5]))


def test_recombine_merges_near_keys() -> None:
    store = KNNStore(4, 1, capacity=10, metric="l2")
    keys = np.array([[1, 0, 0, 0], [1.1, 0, 0, 0], [0, 5, 0, 0]], dtype=np.float32)
    ids = store.insert(keys, np.array([[1.0], [3.0], [100.0]], dtype=np.float32))
    _search_and_reference(store, keys[1:2], k=1)  # an extra reference to entry 1
    crf_before = store._slots.lrfu.crf[ids[:2]].copy()
    found, distances = store.search(np.array([[1.02, 0, 0, 0]], dtype=np.float32), k=3)
    np.testing.assert_array_equal(found[0], ids[[0, 1, 2]])
    assert store.recombine(found, distances, max_distance=0.5) == 1
    assert store.recombine(found, distances, max_distance=0.5) == 0  # the partner is gone now
    assert len(store) == 2 and store.stats.merges == 1
    w = 1.0 / (distances[0, :2] + 1e-6)
    w /= w.sum()
    merged_key, merged_value = store.get(ids[:1])
    np.testing.assert_allclose(merged_key[0], w @ keys[:2], rtol=1e-5)
    np.testing.assert_allclose(merged_value[0, 0], w @ [1.0, 3.0], rtol=1e-5)
    # Histories of entries referenced at different times are decayed to the later one, then added.
    lrfu = store._slots.lrfu
    assert lrfu.crf[ids[0]] == pytest.approx(crf_before[0] * 2 ** (-0.5) + crf_before[1])
    after, after_distances = store.search(merged_key, k=3)
    assert after[0, 0] == ids[0] and after_distances[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert set(after[0].tolist()) == {ids[0], ids[2], -1}


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
@pytest.mark.parametrize(("filled", "k"), [(40, 8), (40, 30), (12, 30)])  # k > n/2: the sides overlap
def test_search_by_magnitude_ranks_by_magnitude(backend: str, filled: int, k: int) -> None:
    index = {"backend": backend, "ef_search": 64, "ef_construction": 200}
    store = KNNStore(key_dim=6, value_dim=1, capacity=64, metric="ip", index=index)
    keys, queries = _rand(filled, 6, 0), _rand(5, 6, 1)
    store.insert(keys, np.zeros((filled, 1), np.float32))
    ids, distances = store.search(queries, k, by_magnitude=True)
    dots = queries @ keys.T  # (5, filled); slots are filled in insert order
    for row in range(len(queries)):
        expected = np.argsort(-np.abs(dots[row]), kind="stable")[:k]
        found = ids[row][ids[row] >= 0]
        assert len(found) == min(k, filled) and len(set(found)) == len(found)  # each entry once
        np.testing.assert_array_equal(np.sort(found), np.sort(expected))
        np.testing.assert_allclose(distances[row, : len(found)], 1.0 - dots[row, found], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(np.abs(dots[row, found])) <= 1e-6)  # largest |q·k| first
        assert np.all(distances[row, len(found) :] == np.inf) and np.all(ids[row, len(found) :] == -1)
    assert store.now == 0  # searching leaves the clock alone


def test_search_by_magnitude_needs_a_similarity_metric() -> None:
    store = KNNStore(key_dim=4, value_dim=1, capacity=8, metric="l2")
    with pytest.raises(ValueError, match=r"by_magnitude ranks by \|similarity\|.*not l2"):
        store.search(_rand(2, 4, 0), 2, by_magnitude=True)


def test_reference_ticks_once_per_query_and_counts_reads() -> None:
    store = KNNStore(4, 1, capacity=6, metric="l2", lrfu_lambda=0.5, index={"backend": "exact"})
    store.insert(_rand(4, 4, 0), np.zeros((4, 1), np.float32))  # slots 0-3 at t=0
    store.reference(np.array([[0, 1, -1], [-1, -1, -1], [1, 1, 5]]))  # ticks 1, 2, 3; slot 5 is free
    assert store.now == 3 and store.stats.reads == 4
    lrfu = store._slots.lrfu
    np.testing.assert_array_equal(lrfu.last[:4], [1, 3, 0, 0])
    # Slot 1: the insert at 0, one reference at 1, two at 3 (duplicates each count); F(x) = 2^(-x/2).
    np.testing.assert_allclose(lrfu.crf[:2], [1 + 2**-0.5, 2 + 2**-1 + 2**-1.5])
    store.reference(np.array([2, 2]))  # 1-D: one query of two references, at tick 4
    store.reference(np.empty((0, 3), dtype=np.int64))  # no query: no tick
    assert store.now == 4 and store.stats.reads == 6 and lrfu.last[2] == 4
    assert lrfu.crf[2] == pytest.approx(2 + 2**-2)
    ids = store.insert(_rand(2, 4, 1), np.zeros((2, 1), np.float32))
    np.testing.assert_array_equal(store.insertion_times(ids), [4, 4])  # inserted at the current clock
    np.testing.assert_array_equal(lrfu.last[ids], [4, 4])
    for bad, message in [
        (np.zeros((1, 1, 1), dtype=np.int64), r"ids must have shape \(N, k\) or \(M,\), got \(1, 1, 1\)"),
        (np.array([[0.5]]), "ids must be an integer array"),
        (np.array([[6]]), r"ids must lie in \[-1, 6\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.reference(bad)
    assert store.now == 4 and store.stats.reads == 6  # refused before any state changed


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_every_eviction_keeps_capacity_and_stores_each_insert_whole(eviction: str) -> None:
    store = KNNStore(8, 1, capacity=50, metric="l2", index={"backend": "exact"}, eviction=eviction)
    for step in range(10):
        keys = _rand(30, 8, step)
        ids = store.insert(keys, np.full((30, 1), step, np.float32))
        assert len(set(ids.tolist())) == 30 and len(store) == min(50, 30 * (step + 1))
        np.testing.assert_array_equal(store.get(ids)[1][:, 0], step)  # no victim among this call's rows
        _search_and_reference(store, keys[:5], k=3)
    assert store.stats.evictions == 300 - 50 and store.eviction == eviction


def _fifo_script(eviction: str) -> list[np.ndarray]:
    """Inserts into a 6-slot store around references that favour the oldest entries; returns the ids of
    each insert."""
    store = KNNStore(4, 1, capacity=6, metric="l2", index={"backend": "exact"}, eviction=eviction)
    zeros = np.zeros((4, 1), np.float32)
    inserted = [store.insert(_rand(3, 4, 0), zeros[:3])]  # slots 0-2 at t=0
    store.reference(np.array([[0, 1, 2]] * 5))  # t=5
    inserted.append(store.insert(_rand(3, 4, 1), zeros[:3]))  # slots 3-5 at t=5
    store.reference(np.array([[4], [0]]))  # t=7
    np.testing.assert_array_equal(store.insertion_times(np.arange(6)), [0, 0, 0, 5, 5, 5])
    inserted.append(store.insert(_rand(4, 4, 2), zeros))  # t=7
    inserted.append(store.insert(_rand(3, 4, 3), zeros[:3]))
    assert store.stats.evictions == 7
    return inserted


def test_fifo_evicts_the_earliest_inserted_whatever_the_references() -> None:
    fifo = _fifo_script("fifo")
    np.testing.assert_array_equal(fifo[2], [0, 1, 2, 3])  # inserted at 0, then the lowest slot of t=5
    np.testing.assert_array_equal(fifo[3], [4, 5, 0])  # t=5 first, then t=7 by lower slot
    lrfu = _fifo_script("lrfu")
    assert set(lrfu[2].tolist()) != {0, 1, 2, 3}  # LRFU keeps the much-referenced oldest entries


def _random_victims(global_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Victims of 600 single inserts and of one 5-row insert into a full 20-slot random-eviction store."""
    np.random.seed(global_seed)  # the global generator plays no part
    torch.manual_seed(global_seed)
    store = KNNStore(4, 1, capacity=20, metric="l2", index={"backend": "exact"}, eviction="random")
    store.insert(_rand(20, 4, 0), np.zeros((20, 1), np.float32))
    victims = []
    for step in range(600):
        if step % 3 == 0:
            store.reference(np.array([[step % 20]]))
        victims.append(store.insert(_rand(1, 4, step + 1), np.zeros((1, 1), np.float32)))
    batch = store.insert(_rand(5, 4, 9999), np.zeros((5, 1), np.float32))
    return np.concatenate(victims), batch


def test_random_eviction_is_uniform_and_the_same_on_every_replica() -> None:
    victims, batch = _random_victims(global_seed=0)
    replica_victims, replica_batch = _random_victims(global_seed=1)
    np.testing.assert_array_equal(victims, replica_victims)
    np.testing.assert_array_equal(batch, replica_batch)
    assert len(set(batch.tolist())) == 5 and batch.min() >= 0
    counts = np.bincount(victims, minlength=20)  # 30 expected per slot
    chi_squared = ((counts - 30) ** 2 / 30).sum()
    assert chi_squared < 43.8  # the 0.1% critical value for 19 degrees of freedom
    assert not np.array_equal(victims[:20], np.arange(20))  # not FIFO's round robin


def test_product_key_store_accepts_but_never_evicts() -> None:
    store = KNNStore(8, 2, capacity=64, metric="ip", index={"backend": "product"}, eviction="random")
    assert store.eviction == "random" and len(store) == 64
    np.testing.assert_array_equal(store.insertion_times(np.arange(64)), np.zeros(64))


def test_insertion_times_need_live_ids_and_merges_keep_the_target_time() -> None:
    store = KNNStore(4, 1, capacity=10, metric="l2")
    first = store.insert(np.array([[1.0, 0, 0, 0]], np.float32), np.zeros((1, 1), np.float32))
    store.reference(np.array([[first[0]]] * 3))  # t=3
    second = store.insert(np.array([[1.1, 0, 0, 0]], np.float32), np.zeros((1, 1), np.float32))
    found, distances = store.search(np.array([[1.09, 0, 0, 0]], np.float32), k=2)
    np.testing.assert_array_equal(found[0], [second[0], first[0]])  # the later entry is the target
    assert store.recombine(found, distances, max_distance=1.0) == 1
    np.testing.assert_array_equal(store.insertion_times(second), [3])
    assert store.insertion_times(np.empty(0, dtype=np.int64)).shape == (0,)
    for dead in (first, np.array([-1]), np.array([7])):
        with pytest.raises(ValueError, match=r"insertion_times\(\) needs ids of live entries"):
            store.insertion_times(dead)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_recall_of_exact_search_is_one_despite_ties_and_dead_slots(metric: str) -> None:
    store = KNNStore(8, 1, capacity=320, metric=metric, index={"backend": "exact"})
    keys = np.tile(_rand(100, 8, 0), (3, 1))  # every key three times: ties at every rank
    store.insert(keys, np.zeros((300, 1), np.float32))
    copies = np.arange(300).reshape(3, 100).T[:30]  # (30, 3) the three slots of each of 30 keys
    assert store.recombine(copies, np.zeros(copies.shape), max_distance=0.0) == 60  # dead: stale keys
    queries = _rand(40, 8, 1)
    lrfu_state = store._slots.lrfu.state_dict()
    before = (store.stats, store.now)
    assert store.recall(queries, 10) == 1.0
    if metric != "l2":
        assert store.recall(queries, 10, by_magnitude=True) == 1.0
    assert (store.stats, store.now) == before  # recall changes nothing
    np.testing.assert_array_equal(store._slots.lrfu.crf, lrfu_state["crf"])
    np.testing.assert_array_equal(store._slots.lrfu.last, lrfu_state["last"])
    assert store.recall(queries, 320) == 1.0  # k beyond the live count: all 240 live entries
    assert np.isnan(store.recall(queries[:0], 5))
    assert np.isnan(KNNStore(8, 1, capacity=4, metric=metric).recall(queries, 2))  # empty store
    with pytest.raises(ValueError, match=r"k=321"):
        store.recall(queries, 321)


def test_recall_measures_hnsw_search_breadth(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KNNStore(32, 1, capacity=4000, metric="cosine", index={"num_threads": 1})
    store.insert(_rand(4000, 32, 0), np.zeros((4000, 1), np.float32))
    queries = _rand(300, 32, 1)
    assert store._index.ef_search is None  # derived from k and the size: the default
    assert store.recall(queries, 16) >= 0.95
    store._index.set_ef(1)  # raised to k: far too narrow for 4000 random 32-d keys
    narrow = store.recall(queries, 16)
    assert narrow < 0.9
    monkeypatch.setattr("dmt.memory.recall.RECALL_KEY_BLOCK", 333)  # blocks that split the live keys
    monkeypatch.setattr("dmt.memory.recall.RECALL_QUERY_BLOCK", 7)
    assert store.recall(queries, 16) == pytest.approx(narrow, abs=1e-3)


def test_read_counts_origins_and_lrfu_scores_per_entry() -> None:
    store = KNNStore(4, 1, capacity=6, metric="l2", lrfu_lambda=0.5, index={"backend": "exact"})
    keys = np.array([[0, 0, 0, 0], [0.1, 0, 0, 0], [5, 0, 0, 0]], dtype=np.float32)
    tokens = np.arange(3 * ORIGIN_SPAN).reshape(3, ORIGIN_SPAN)
    values = np.zeros((3, 1), np.float32)
    ids = store.insert(keys, values, origin_units=[7, -1, 9], origin_tokens=tokens, next_tokens=[4, 5, -1])
    np.testing.assert_array_equal(store.live_ids(), [0, 1, 2])
    # next tokens of any shape of ids; padding (-1) answers -1
    np.testing.assert_array_equal(store.next_tokens(np.array([[2, 0], [-1, 1]])), [[-1, 4], [-1, 5]])
    units, spans = store.origins(ids)
    assert units.dtype == spans.dtype == np.int32
    np.testing.assert_array_equal(units, [7, -1, 9])
    np.testing.assert_array_equal(spans, tokens)
    store.reference(np.array([[0, 0, 1], [1, -1, 2]]))  # ticks 1 and 2; duplicates each count
    np.testing.assert_array_equal(store.read_counts(ids), [2, 2, 1])
    # CRF at the clock (2): slot 0 = the insert at 0 and two references at 1, F(x) = 2^(-x/2).
    np.testing.assert_allclose(store.lrfu_scores(ids[:1]), [2**-1 + 2 * 2**-0.5])
    found, distances = store.search(keys[:1], k=2)
    assert store.recombine(found, distances, max_distance=1.0) == 1  # entry 1 folds into entry 0
    np.testing.assert_array_equal(store.live_ids(), [0, 2])
    np.testing.assert_array_equal(store.read_counts(np.array([0])), [4])  # the counts add up
    np.testing.assert_array_equal(store.origins(np.array([0]))[0], [7])  # the target's origin stays
    refilled = store.insert(np.ones((1, 4), np.float32), np.zeros((1, 1), np.float32))  # the freed slot 1
    np.testing.assert_array_equal(refilled, [1])
    np.testing.assert_array_equal(store.read_counts(refilled), [0])
    np.testing.assert_array_equal(store.origins(refilled)[0], [-1])
    np.testing.assert_array_equal(store.origins(refilled)[1], np.full((1, ORIGIN_SPAN), -1))
    np.testing.assert_array_equal(store.next_tokens(refilled), [-1])
    np.testing.assert_array_equal(store.next_tokens(np.array([1, 0])), [-1, 4])  # a merged-away id: -1
    for method in ("lrfu_scores", "read_counts", "origins"):
        with pytest.raises(ValueError, match=rf"{method}\(\) needs ids of live entries"):
            getattr(store, method)(np.array([4]))


@pytest.mark.parametrize(
    ("origins", "message"),
    [
        ({"origin_units": np.zeros(2, np.int64)}, r"origin_units must have shape \(1,\), got \(2,\)"),
        ({"origin_tokens": np.zeros((1, 3), np.int64)}, r"origin_tokens must have shape \(1, 8\)"),
        ({"origin_units": np.array([0.5])}, "origin_units must be an integer array"),
        ({"origin_tokens": np.full((1, ORIGIN_SPAN), -2)}, r"origin_tokens must lie in \[-1, 2\*\*31\)"),
        ({"next_tokens": np.zeros(3, np.int64)}, r"next_tokens must have shape \(1,\), got \(3,\)"),
    ],
)
def test_insert_rejects_malformed_origins(origins: dict[str, np.ndarray], message: str) -> None:
    store = KNNStore(4, 1, capacity=4, metric="l2")
    with pytest.raises(ValueError, match=message):
        store.insert(np.ones((1, 4), np.float32), np.ones((1, 1), np.float32), **origins)
    assert len(store) == 0


def test_token_spans_end_at_each_token_left_padded() -> None:
    token_ids = np.arange(20).reshape(2, 10) + 100  # (B=2, T=10)
    spans = token_spans(token_ids, np.array([0, 1, 1]), np.array([2, 9, 7]))
    np.testing.assert_array_equal(spans[0], [-1] * (ORIGIN_SPAN - 3) + [100, 101, 102])
    np.testing.assert_array_equal(spans[1], token_ids[1, 10 - ORIGIN_SPAN :])
    np.testing.assert_array_equal(spans[2], token_ids[1, 8 - ORIGIN_SPAN : 8])
