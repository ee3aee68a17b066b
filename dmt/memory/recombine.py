"""Which entries :meth:`KNNStore.recombine <dmt.memory.store.KNNStore.recombine>` folds together, and with
what weights.

Per row of a search result ``ids (N, k)``, ``distances (N, k)``, the live returned entries with ``distance <=
max_distance`` (at least 2) form a group, nearest first; it is folded into its nearest entry with weights
``1 / (distance + 1e-6)``, normalised (distances clipped at 0, as ``ip`` distances can be negative). The
distances are those of the query, i.e. not recomputed after an earlier row moved a key.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator

import numpy as np


def check_merge_args(ids: np.ndarray, distances: np.ndarray, max_distance: float) -> np.ndarray:
    """``distances`` as an array, after checking that it has the ``(N, k)`` shape of ``ids`` and that
    ``max_distance`` is a number (``ValueError`` otherwise)."""
    all_distances = np.asarray(distances)
    if np.ndim(ids) != 2 or np.shape(ids) != all_distances.shape:
        raise ValueError(
            f"ids and distances must have the same (N, k) shape, got {np.shape(ids)} and "
            f"{all_distances.shape}"
        )
    if not isinstance(max_distance, numbers.Real) or np.isnan(max_distance):
        raise ValueError(f"max_distance must be a number, got {max_distance!r}")
    return all_distances


def merge_groups(
    ids: np.ndarray,
    distances: np.ndarray,
    max_distance: float,
    is_live: Callable[[np.ndarray], np.ndarray],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The groups of checked ``ids (N, k)`` (-1 padding) and ``distances (N, k)``, row by row: members
    ``(m,)`` int64, nearest first (the one they fold into), and their weights ``(m,)`` float32, summing to 1.

    ``is_live`` maps ids ``(k,)`` to ``(k,)`` bool; it is asked for each row only after the caller has
    applied the merges of the rows before, so entries merged away earlier are skipped.
    """
    for row_ids, row_distances in zip(ids, distances, strict=True):
        near = is_live(row_ids) & (row_distances <= max_distance)
        if np.count_nonzero(near) < 2:
            continue
        weights = 1.0 / (np.maximum(row_distances[near], 0.0) + 1e-6)
        yield row_ids[near], (weights / weights.sum()).astype(np.float32)
