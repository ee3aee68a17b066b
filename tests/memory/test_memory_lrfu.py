"""LRFU policy: hand-worked CRFs, the LFU/LRU limits, merging and state round trips."""

from __future__ import annotations

import numpy as np
import pytest

from dmt.memory import LRFU


def test_hand_worked_reference_string() -> None:
    lrfu = LRFU(3, lam=0.5)
    lrfu.reset(np.arange(3), now=0)
    lrfu.reference(np.array([0, 0]), now=1)  # duplicates: crf0 = 2 + F(1)·1
    lrfu.reference(np.array([1]), now=2)  # crf1 = 1 + F(2)·1
    np.testing.assert_allclose(lrfu.crf, [2 + 2**-0.5, 1.5, 1.0])
    # CRF as of t=4: slot0 (2 + 2^-0.5)·2^-1.5 ≈ 0.957, slot1 1.5·2^-1 = 0.75, slot2 2^-2 = 0.25.
    np.testing.assert_allclose(np.exp2(lrfu.score(np.arange(3), now=4)), [0.9571, 0.75, 0.25], atol=1e-4)
    np.testing.assert_array_equal(lrfu.victims(np.ones(3, dtype=bool), 3, now=4), [2, 1, 0])
    lrfu.reference(np.array([2]), now=4)  # crf2 = 1 + 0.25 = 1.25: now the most valuable
    np.testing.assert_array_equal(lrfu.victims(np.arange(3), 3, now=4), [1, 0, 2])
    np.testing.assert_array_equal(lrfu.victims(np.array([0, 2]), 1, now=4), [0])


def _replay(lam: float, refs: np.ndarray, capacity: int) -> LRFU:
    lrfu = LRFU(capacity, lam)
    lrfu.reset(np.arange(capacity), now=0)
    for t, slot in enumerate(refs, start=1):
        lrfu.reference(np.array([slot]), now=t)
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
