"""Recall@k of a store's index against exact search over its live entries (:meth:`KNNStore.recall
<dmt.memory.store.KNNStore.recall>`).

Exact search is brute force over the live keys in blocks of :data:`RECALL_KEY_BLOCK` keys and
:data:`RECALL_QUERY_BLOCK` queries, so memory stays bounded for any store, in the conventions of
:mod:`dmt.memory.metrics`. A returned entry counts as correct when it ranks within
:data:`RECALL_TIE_TOLERANCE` of the k-th exact one, so ties are not misses.
"""

from __future__ import annotations

import numpy as np
import torch

from dmt.memory.base import as_float_matrix, check_k
from dmt.memory.index import KeyIndex
from dmt.memory.metrics import Metric, pairwise_distance_np

# Queries × keys per exact distance block.
RECALL_QUERY_BLOCK = 1024
RECALL_KEY_BLOCK = 4096
# An approximate neighbour this close to the k-th exact distance is a tie, not a miss.
RECALL_TIE_TOLERANCE = 1e-5


def recall_at_k(
    index: KeyIndex, queries: np.ndarray, k: int, keys: np.ndarray, live: np.ndarray, by_magnitude: bool
) -> float:
    """The fraction of each query's exact top ``min(k, L)`` among the ``live (L,)`` slots (ascending) that
    ``index`` returns, averaged over ``queries (N, key_dim)``; NaN when ``L = 0`` or ``N = 0``. ``k`` and
    the queries are checked as a store's search checks them; the index is searched directly, so no
    counter of the store moves.

    Args:
        keys: the store's keys, indexed by slot (``(R, key_dim)``, every live slot below ``R``).
        by_magnitude: rank by ``|similarity|`` (``ip``, ``cosine``), in the index search and the exact one.
    """
    check_k(k, index.capacity, index.metric, by_magnitude)
    queries = as_float_matrix("queries", queries, index.dim)
    k_live = min(int(k), len(live))
    if k_live == 0 or len(queries) == 0:
        return float("nan")
    found = index.search_torch(torch.from_numpy(queries), int(k), by_magnitude)[0].numpy()  # (N, k)
    hits = sum(
        exact_hits(
            queries[begin : begin + RECALL_QUERY_BLOCK],
            found[begin : begin + RECALL_QUERY_BLOCK],
            keys,
            live,
            k_live,
            index.metric,
            by_magnitude,
        )
        for begin in range(0, len(queries), RECALL_QUERY_BLOCK)
    )
    return hits / (len(queries) * k_live)


def exact_hits(
    queries: np.ndarray,
    found: np.ndarray,
    keys: np.ndarray,
    live: np.ndarray,
    k_live: int,
    metric: Metric,
    by_magnitude: bool,
) -> int:
    """How many of ``found (n, k)`` (ids, -1 padding) rank within the exact top ``k_live`` of their row of
    ``queries (n, key_dim)`` among the ``live (L,)`` slots of ``keys``, ties included."""
    exact = np.full((len(queries), k_live), np.inf, dtype=np.float32)  # (n, k_live) best ranks so far
    found_rank = np.full(found.shape, np.inf, dtype=np.float32)  # (n, k) rank of each returned id
    position = np.searchsorted(live, found)  # (n, k) index into live; meaningless for -1
    for begin in range(0, len(live), RECALL_KEY_BLOCK):
        block = live[begin : begin + RECALL_KEY_BLOCK]
        rank = pairwise_distance_np(queries, keys[block], metric)  # (n, b), lower is nearer
        if by_magnitude:
            rank = -np.abs(1.0 - rank)  # largest |similarity| first
        exact = np.partition(np.concatenate([exact, rank], axis=1), k_live - 1, axis=1)[:, :k_live]
        rows, cols = np.nonzero((found >= 0) & (position >= begin) & (position < begin + len(block)))
        found_rank[rows, cols] = rank[rows, position[rows, cols] - begin]
    threshold = exact.max(axis=1, keepdims=True) + RECALL_TIE_TOLERANCE  # (n, 1): the k-th exact rank
    return int(np.count_nonzero(found_rank <= threshold))
