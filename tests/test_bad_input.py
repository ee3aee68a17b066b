"""Malformed inputs to ``KNNStore``: each is refused with a ``ValueError`` naming the problem."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dmt.memory import KNNStore

KEY_DIM, VALUE_DIM, CAPACITY = 4, 3, 10


def _f32(*shape: int) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def _with(value: float, *shape: int) -> np.ndarray:
    array = _f32(*shape)
    array.flat[-1] = value
    return array


@pytest.fixture
def store() -> KNNStore:
    store = KNNStore(KEY_DIM, VALUE_DIM, capacity=CAPACITY)
    store.insert(np.eye(KEY_DIM, dtype=np.float32), _f32(KEY_DIM, VALUE_DIM))
    return store


Call = Callable[[KNNStore], Any]
BAD_INPUTS: list[tuple[str, Call, str]] = [
    # search: shape, dtype, values, k
    ("search 1-D", lambda s: s.search(_f32(KEY_DIM), k=1), r"queries must have shape \(N, 4\)"),
    ("search 3-D", lambda s: s.search(_f32(2, 1, KEY_DIM), k=1), r"queries must have shape"),
    ("search feature dim", lambda s: s.search(_f32(2, 5), k=1), r"got \(2, 5\)"),
    ("search ints", lambda s: s.search(np.ones((2, KEY_DIM), dtype=np.int64), k=1), "floating-point"),
    ("search bools", lambda s: s.search(np.ones((2, KEY_DIM), dtype=bool), k=1), "floating-point"),
    ("search objects", lambda s: s.search(_f32(2, KEY_DIM).astype(object), k=1), "floating-point"),
    ("search NaN", lambda s: s.search(_with(np.nan, 2, KEY_DIM), k=1), "queries contains NaN"),
    ("search inf", lambda s: s.search(_with(-np.inf, 2, KEY_DIM), k=1), "queries contains NaN or inf"),
    ("k zero", lambda s: s.search(_f32(1, KEY_DIM), k=0), r"k must be an integer in \[1, capacity=10\]"),
    ("k negative", lambda s: s.search(_f32(1, KEY_DIM), k=-2), "got k=-2"),
    ("k above capacity", lambda s: s.search(_f32(1, KEY_DIM), k=CAPACITY + 1), "got k=11"),
    ("k float", lambda s: s.search(_f32(1, KEY_DIM), k=2.0), "got k=2.0"),
    ("k bool", lambda s: s.search(_f32(1, KEY_DIM), k=True), "got k=True"),
    # insert
    ("insert keys dim", lambda s: s.insert(_f32(2, 5), _f32(2, VALUE_DIM)), r"keys must have shape \(N, 4\)"),
    (
        "insert values dim",
        lambda s: s.insert(_f32(2, KEY_DIM), _f32(2, 2)),
        r"values must have shape \(N, 3\)",
    ),
    ("insert keys 1-D", lambda s: s.insert(_f32(KEY_DIM), _f32(1, VALUE_DIM)), "keys must have shape"),
    (
        "insert int keys",
        lambda s: s.insert(np.ones((2, KEY_DIM), int), _f32(2, VALUE_DIM)),
        "keys must be a float",
    ),
    (
        "insert bool values",
        lambda s: s.insert(_f32(2, KEY_DIM), np.ones((2, 3), bool)),
        "values must be a float",
    ),
    (
        "insert NaN keys",
        lambda s: s.insert(_with(np.nan, 2, KEY_DIM), _f32(2, VALUE_DIM)),
        "keys contains NaN",
    ),
    ("insert inf values", lambda s: s.insert(_f32(2, KEY_DIM), _with(np.inf, 2, 3)), "values contains NaN"),
    ("insert row mismatch", lambda s: s.insert(_f32(2, KEY_DIM), _f32(3, VALUE_DIM)), "2 keys but 3 values"),
    # update_values
    ("deltas dim", lambda s: s.update_values(np.array([0]), _f32(1, 2)), r"deltas must have shape \(N, 3\)"),
    ("deltas ints", lambda s: s.update_values(np.array([0]), np.ones((1, 3), int)), "deltas must be a float"),
    ("deltas NaN", lambda s: s.update_values(np.array([0]), _with(np.nan, 1, 3)), "deltas contains NaN"),
    ("deltas inf", lambda s: s.update_values(np.array([0]), _with(np.inf, 1, 3)), "deltas contains NaN"),
    ("ids float", lambda s: s.update_values(np.array([0.7]), _f32(1, 3)), "ids must be an integer array"),
    ("ids bool", lambda s: s.update_values(np.array([True]), _f32(1, 3)), "ids must be an integer array"),
    ("ids out of range", lambda s: s.update_values(np.array([CAPACITY]), _f32(1, 3)), r"ids must lie in"),
    ("ids below -1", lambda s: s.update_values(np.array([-2]), _f32(1, 3)), r"ids must lie in"),
    ("ids/deltas count", lambda s: s.update_values(np.array([0, 1]), _f32(1, 3)), "2 ids but 1 deltas"),
    # get / recombine
    ("get dead id", lambda s: s.get(np.array([CAPACITY - 1])), "ids of live entries"),
    ("get padding id", lambda s: s.get(np.array([-1])), "ids of live entries"),
    (
        "recombine shapes",
        lambda s: s.recombine(np.zeros((2, 3), int), _f32(2, 2), 1.0),
        "same",
    ),
    (
        "recombine NaN threshold",
        lambda s: s.recombine(np.array([[0, 1]]), _f32(1, 2), np.nan),
        "max_distance",
    ),
]


@pytest.mark.parametrize(
    ("call", "fragment"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_refused(store: KNNStore, call: Call, fragment: str) -> None:
    entries, now = len(store), store.now
    with pytest.raises(ValueError, match=fragment):
        call(store)
    assert len(store) == entries and store.now == now  # refused before any state changed


def test_empty_batches_are_no_ops(store: KNNStore) -> None:
    before = store.stats
    ids, distances = store.search(_f32(0, KEY_DIM), k=3)
    assert ids.shape == distances.shape == (0, 3)
    assert store.insert(_f32(0, KEY_DIM), _f32(0, VALUE_DIM)).shape == (0,)
    store.update_values(np.zeros(0, dtype=np.int64), _f32(0, VALUE_DIM))
    assert store.get(np.zeros(0, dtype=np.int64))[0].shape == (0, KEY_DIM)
    assert store.stats == before


def test_empty_store_answers_cold_start() -> None:
    store = KNNStore(KEY_DIM, VALUE_DIM, capacity=CAPACITY)
    ids, distances = store.search(_f32(2, KEY_DIM), k=CAPACITY)
    assert (ids == -1).all() and np.isinf(distances).all()
    assert store.get(ids[ids >= 0])[1].shape == (0, VALUE_DIM)  # nothing found: nothing to read
