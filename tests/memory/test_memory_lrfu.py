"""LRFU policy: hand-worked CRFs, the LFU/LRU limits (also for the references of one search through a
store), merging and state round trips."""

from __future__ import annotations

import numpy as np
import pytest

from dmt.memory import LRFU, KNNStore


def test_hand_worked_reference_string() -> None:
    lrfu = LRFU(3, lam=0.5)
    lrfu.reset(np.arange(3), now=0)
    lrfu.reference(np.array([0, 0]), times=1)  # duplicates: crf0 = 2 + F(1)·1
    lrfu.reference(np.array([1]), times=2)  # crf1 = 1 + F(2)·1
    np.testing.assert_allclose(lrfu.crf, [2 + 2**-0.5, 1.5, 1.0])
    # CRF as of t=4: slot0 (2 + 2^-0.5)·2^-1.5 ≈ 0.957, slot1 1.5·2^-1 = 0.75, slot2 2^-2 = 0.25.
    np.testing.assert_allclose(np.exp2(lrfu.score(np.arange(3), now=4)), [0.9571, 0.75, 0.25], atol=1e-4)
    np.testing.assert_array_equal(lrfu.victims(np.ones(3, dtype=bool), 3, now=4), [2, 1, 0])
    lrfu.reference(np.array([2]), times=4)  # crf2 = 1 + 0.25 = 1.25: now the most valuable
    np.testing.assert_array_equal(lrfu.victims(np.arange(3), 3, now=4), [1, 0, 2])
    np.testing.assert_array_equal(lrfu.victims(np.array([0, 2]), 1, now=4), [0])


def _replay(lam: float, refs: np.ndarray, capacity: int) -> LRFU:
    lrfu = LRFU(capacity, lam)
    lrfu.reset(np.arange(capacity), now=0)
    for t, slot in enumerate(refs, start=1):
        lrfu.reference(np.array([slot]), times=t)
    return lrfu


def test_lambda_zero_is_lfu() -> None:
    rng = np.random.default_rng(0)
    capacity = 20
    refs = rng.integers(0, capacity, size=200)
    lrfu = _replay(0.0, refs, capacity)
    counts = 1 + np.bincount(refs, minlength=capacity)
    np.testing.assert_allclose(lrfu.crf, counts)
    slots = np.arange(capacity)
    expected = np.lexsort((slots, lrfu.last, counts))  # fewest references, then oldest, then lowest id
    np.testing.assert_array_equal(lrfu.victims(slots, capacity, now=len(refs)), expected)


def test_lambda_one_is_lru_even_after_long_idle() -> None:
    rng = np.random.default_rng(1)
    capacity = 20
    refs = rng.integers(0, capacity, size=200)
    lrfu = _replay(1.0, refs, capacity)
    now = 10_000  # F(now - last) underflows to 0 in linear space; log-space scores must stay ordered
    slots = np.arange(capacity)
    assert np.isfinite(lrfu.score(slots, now)).all()
    expected = np.lexsort((slots, lrfu.last))
    np.testing.assert_array_equal(lrfu.victims(slots, capacity, now=now), expected)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_references_at_many_times_equal_one_at_a_time(lam: float) -> None:
    rng = np.random.default_rng(2)
    capacity, rows, per_row = 12, 40, 5
    slots = rng.integers(0, capacity, size=(rows, per_row))  # (40, 5), duplicates within rows too
    one_at_a_time, vectorised = LRFU(capacity, lam), LRFU(capacity, lam)
    for lrfu in (one_at_a_time, vectorised):
        lrfu.reset(np.arange(capacity), now=0)
        lrfu.reference(np.array([3, 3, 7]), times=2)  # an older history to decay
    for t, row in enumerate(slots, start=3):
        one_at_a_time.reference(row, times=t)
    ticks = np.repeat(np.arange(3, 3 + rows), per_row)  # (200,)
    order = rng.permutation(ticks.size)  # the order of the references within the call does not matter
    vectorised.reference(slots.ravel()[order], times=ticks[order])
    np.testing.assert_allclose(vectorised.crf, one_at_a_time.crf, rtol=1e-12)
    np.testing.assert_array_equal(vectorised.last, one_at_a_time.last)
    vectorised.reference(np.empty(0, dtype=np.int64), times=50)  # no references: nothing changes
    np.testing.assert_array_equal(vectorised.last, one_at_a_time.last)


def _one_search_of_references(capacity: int, lam: float) -> tuple[KNNStore, np.ndarray]:
    """A full exact store of ``capacity`` entries inserted at t=0, then ONE reference() call with the
    ``(N, k)`` ids of a search: distinct ids per row, -1 padding, one row without any id."""
    store = KNNStore(4, 1, capacity, metric="l2", lrfu_lambda=lam, index={"backend": "exact"})
    rng = np.random.default_rng(3)
    store.insert(rng.standard_normal((capacity, 4)), np.zeros((capacity, 1)))
    rows, k = 30, 4
    others = np.delete(np.arange(capacity), 5)
    ids = np.stack([rng.choice(others, k, replace=False) for _ in range(rows)])  # (30, 4)
    ids[:25:3, 0] = 5  # slot 5: referenced most often, but not in the last rows
    ids[rng.random(ids.shape) < 0.3] = -1
    ids[7] = -1
    store.reference(ids)
    assert store.now == rows and store.stats.reads == np.count_nonzero(ids >= 0)
    return store, ids


def _evicted_in_order(store: KNNStore) -> np.ndarray:
    """Slots in eviction order: refilling a full store evicts lowest score first, one slot per row."""
    rng = np.random.default_rng(4)
    return store.insert(rng.standard_normal((store.capacity, 4)), np.zeros((store.capacity, 1)))


def test_lambda_one_evicts_in_lru_order_within_one_search() -> None:
    capacity = 16
    store, ids = _one_search_of_references(capacity, lam=1.0)
    last_row = np.zeros(capacity, dtype=np.int64)  # 0: only the insert at t=0
    for row, slots in enumerate(ids, start=1):  # row n is referenced at tick n + 1
        last_row[slots[slots >= 0]] = row
    evicted = _evicted_in_order(store)
    np.testing.assert_array_equal(np.sort(evicted), np.arange(capacity))
    # Least recent row first; entries last referenced in the same row tie in LRU (LRFU then evicts the
    # less frequently referenced first).
    np.testing.assert_array_equal(last_row[evicted], np.sort(last_row))
    counts, order = np.bincount(ids[ids >= 0], minlength=capacity), list(evicted)
    assert counts[5] >= 3 * counts[14] and order.index(5) < order.index(14)  # frequency does not protect


def test_lambda_zero_evicts_in_lfu_order_within_one_search() -> None:
    capacity = 16
    store, ids = _one_search_of_references(capacity, lam=0.0)
    counts = 1 + np.bincount(ids[ids >= 0], minlength=capacity)  # the insert counts as one
    last_row = np.zeros(capacity, dtype=np.int64)
    for row, slots in enumerate(ids, start=1):
        last_row[slots[slots >= 0]] = row
    slots = np.arange(capacity)
    expected = np.lexsort((slots, last_row, counts))  # fewest references, then least recent, lower slot
    np.testing.assert_array_equal(_evicted_in_order(store), expected)


def test_victims_tie_break_and_bounds() -> None:
    lrfu = LRFU(4, lam=0.0)
    lrfu.reset(np.array([3, 1]), now=0)
    lrfu.reset(np.array([2, 0]), now=5)
    # Equal CRF everywhere: older `last` first, then lower slot id.
    np.testing.assert_array_equal(lrfu.victims(np.arange(4), 4, now=5), [1, 3, 0, 2])
    np.testing.assert_array_equal(lrfu.victims(np.arange(4), 0, now=5), np.empty(0, dtype=np.int64))
    with pytest.raises(ValueError, match="victims"):
        lrfu.victims(np.arange(2), 3, now=5)


def test_merge_adds_crfs_at_common_time() -> None:
    lrfu = LRFU(3, lam=0.5)
    lrfu.reset(np.array([0]), now=0)
    lrfu.reset(np.array([1, 2]), now=4)
    lrfu.merge(1, np.array([0, 2]))
    np.testing.assert_allclose(lrfu.crf, [0.0, 2**-2 + 1 + 1, 0.0])
    assert lrfu.last[1] == 4


def test_state_round_trip_and_validation() -> None:
    lrfu = _replay(0.3, np.array([1, 2, 2, 0, 4]), capacity=5)
    state = lrfu.state_dict()
    restored = LRFU(5, lam=0.9)
    restored.load_state_dict(state)
    assert restored.lam == 0.3
    np.testing.assert_array_equal(restored.crf, lrfu.crf)
    np.testing.assert_array_equal(restored.last, lrfu.last)
    with pytest.raises(ValueError, match="shape"):
        LRFU(6, lam=0.3).load_state_dict(state)
    with pytest.raises(ValueError, match="lam"):
        LRFU(5, lam=1.5)
