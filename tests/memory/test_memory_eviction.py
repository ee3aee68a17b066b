"""Choosing victims: the selection by score, then each tie key, then slot, equals a full sort."""

from __future__ import annotations

import numpy as np
import pytest

from dmt.memory.eviction import lowest


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 7, 500, 1999, 2000])
def test_lowest_equals_a_full_lexicographic_sort_among_many_ties(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    slots = rng.permutation(5000)[:2000].astype(np.int64)  # distinct, unordered
    with np.errstate(divide="ignore"):  # log2(0) = -inf: a slot never referenced, as LRFU scores it
        score = np.log2(rng.integers(0, 4, 2000).astype(np.float64))  # LFU-like: few distinct values
    last = rng.integers(0, 3, 2000)  # ties on the tie key too
    expected = slots[np.lexsort((slots, last, score))][:n]
    np.testing.assert_array_equal(lowest(slots, n, score, last), expected)
    np.testing.assert_array_equal(lowest(slots, n, score), slots[np.lexsort((slots, score))][:n])
