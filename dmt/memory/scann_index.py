"""ScaNN index (Google's Scalable Nearest Neighbors): the store's keys filed under a k-means tree of
``leaves`` partitions, scored in the ``leaves_to_search`` nearest partitions by 4-bit anisotropic codes
(one code per dimension, scored from SIMD lookup tables), and the best max(128, 4·k) re-ranked exactly.

A query scans about as many keys as faiss's inverted file does at the same recall, but compares codes of
half a byte per dimension instead of float32 vectors, so a read of a large pack costs several times less
(docs/results.md, "A different design for the read-only target: ScaNN"). The wrapper is a partitioned
index (:mod:`dmt.memory.trained`: exact until trained, slots as labels, ``leaves_to_search`` calibrated on
real queries, never saved), plus:

- **Slots kept across renumbering.** ScaNN numbers its points ``0 .. size - 1`` and fills a deleted one
  with its last; :attr:`ScannIndex._label_at` and :attr:`ScannIndex._position` mirror that, so an
  eviction deletes exactly the evicted slots.
- **Retraining on growth and turnover.** The tree is retrained from the live keys when the store has
  grown :data:`~dmt.memory.trained.GROWTH` times past the size it was trained at (``leaves`` follows
  ``2 · sqrt(size)``), or, at the next insert, once keys numbering :data:`TURNOVER` of that size were
  removed since (a full store that evicts as it inserts never grows). Keys inserted in between are filed
  in the partitions trained before; ScaNN exposes no quantisation error to track drift by, as faiss's
  lists do, and inserts at a third of faiss's rate, so ``auto`` never chooses it: it suits stores read far
  more than they change (a memorised pack, a full training store whose steps insert a few keys per
  thousand queries).

cosine and ip keys are scored by dot product with anisotropic codes (cosine ones normalised, where the
quantisation threshold :data:`ANISOTROPIC_THRESHOLD` is ScaNN's recommended 0.2); l2 keys by squared
distance. No SOAR spilling: ScaNN 1.4's delete crashes on a spilled tree.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dmt.memory.trained import GROWTH, TrainedIndex, check_partition_settings, derived_partitions

# Training sample: at most this many keys per partition.
SAMPLE_PER_LEAF = 128
ANISOTROPIC_THRESHOLD = 0.2
# Candidates re-ranked exactly per query: this many times k, at least MIN_REORDER.
REORDER_PER_K = 4
MIN_REORDER = 128
# Retrain once keys numbering this fraction of the trained size were removed since the last training.
TURNOVER = 0.5
# Queries a search thread takes at a time (a search of more is spread over threads).
QUERY_BATCH = 256


def derived_leaves(size: int) -> int:
    """Partitions for a store of ``size`` keys: the power of two nearest ``2 · sqrt(size)`` (ScaNN's
    guideline is about sqrt(N)), at most one per :data:`SAMPLE_PER_LEAF` / 2 keys, and at least 16."""
    return derived_partitions(size, 2, SAMPLE_PER_LEAF // 2)


def scann_searcher(vectors: np.ndarray, metric: str, leaves: int, sample: int) -> Any:
    """A ScaNN searcher over ``vectors (N, D)`` (normalised already for cosine): a ``leaves``-partition
    k-means tree trained on ``sample`` of them, 4-bit anisotropic codes, exact re-ranking."""
    import scann  # imported late: a large native library that only this backend needs

    distance = "squared_l2" if metric == "l2" else "dot_product"
    builder = scann.scann_ops_pybind.builder(vectors, 1, distance).tree(
        num_leaves=leaves,
        num_leaves_to_search=1,
        training_sample_size=sample,
        spherical=metric == "cosine",
    )  # no SOAR spilling: ScaNN 1.4's delete crashes on a spilled tree
    if metric == "l2":
        builder = builder.score_ah(1)
    else:
        builder = builder.score_ah(1, anisotropic_quantization_threshold=ANISOTROPIC_THRESHOLD)
    return builder.reorder(MIN_REORDER).build().searcher


class ScannIndex(TrainedIndex):
    """k-nearest search through a ScaNN searcher over labels ``0 .. capacity - 1`` (exact search while
    the store is smaller than :data:`~dmt.memory.trained.TRAIN_MIN`).

    Args:
        leaves: k-means partitions; None derives them from the live size at each training
            (:func:`derived_leaves`).
        leaves_to_search: partitions a query scans; None calibrates it after each training for
            recall@k >= :data:`~dmt.memory.trained.CALIBRATION_RECALL` on real queries.
    """

    backend = "scann"

    def __init__(
        self,
        dim: int,
        metric: str,
        capacity: int,
        leaves: int | None = None,
        leaves_to_search: int | None = None,
    ) -> None:
        self.check_settings(leaves, leaves_to_search)
        super().__init__(dim, metric, capacity, breadth=leaves_to_search)
        self.leaves_setting = leaves
        self._searcher: Any = None
        self._leaves = 0
        self._label_at = np.full(capacity, -1, dtype=np.int64)  # (capacity,) ScaNN point -> label
        self._position = np.full(capacity, -1, dtype=np.int64)  # (capacity,) label -> point, -1: none
        self._filed = 0  # ScaNN's points: 0 .. filed - 1
        self.removed_since = 0  # keys removed since the last training

    @staticmethod
    def check_settings(leaves: int | None, leaves_to_search: int | None) -> None:
        """``ValueError`` naming ``leaves`` or ``leaves_to_search`` unless each is None or an integer >= 1
        (and ``leaves_to_search <= leaves`` when both are given)."""
        check_partition_settings("leaves", leaves, "leaves_to_search", leaves_to_search)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "leaves": self.leaves_setting,
            "leaves_to_search": self.breadth_setting,
        }

    @property
    def trained(self) -> bool:
        return self._searcher is not None

    @property
    def partitions(self) -> int:
        return self._leaves

    @property
    def leaves_to_search(self) -> int | None:
        """Partitions a query scans (None until calibrated, and before training)."""
        return self._breadth

    @property
    def filed_entries(self) -> int:
        """Keys in the searcher (every live key once trained, 0 before)."""
        return self._filed

    @property
    def search_state(self) -> dict[str, Any]:
        return self.state("leaves", "leaves_to_search")

    def _file(self, labels: np.ndarray) -> None:
        positions = self._searcher.upsert([None] * len(labels), self._vectors(labels), 1)  # appended
        self._label_at[positions], self._position[labels] = labels, positions
        self._filed += len(labels)
        if len(self) >= GROWTH * self.trained_on or self.removed_since >= TURNOVER * self.trained_on:
            self.train()

    def _unfile(self, labels: np.ndarray) -> None:
        """Delete ``labels`` (filed, distinct) from the searcher: each deleted point takes the last one's
        vector and number, as ScaNN's delete does, one after the other."""
        positions = []
        for label in labels.tolist():
            position, last = int(self._position[label]), self._filed - 1
            moved = self._label_at[last]
            self._label_at[position], self._position[moved] = moved, position
            self._label_at[last], self._position[label] = -1, -1
            self._filed = last
            positions.append(position)
        self._searcher.delete(positions)
        self.removed_since += len(positions)

    def train(self) -> None:
        """(Re)train the tree and codes on the live keys and file every live key; the breadth is
        recalibrated at the next search unless it was given."""
        started = time.perf_counter()
        live = np.flatnonzero(self._live)
        leaves = min(self.leaves_setting or derived_leaves(len(live)), len(live))
        sample = min(len(live), SAMPLE_PER_LEAF * leaves)
        self._searcher = scann_searcher(self._vectors(live), self.metric, leaves, sample)
        self._label_at[:] = self._position[:] = -1
        self._label_at[: len(live)], self._position[live] = live, np.arange(len(live))
        self._filed = len(live)
        self._leaves, self.trained_on, self.removed_since = leaves, len(live), 0
        self._trained(time.perf_counter() - started)

    def _approximate(self, queries: np.ndarray, k: int, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        reorder = max(MIN_REORDER, REORDER_PER_K * k)
        found, scores = self._searcher.search_batched(
            queries, k, reorder, breadth, len(queries) > QUERY_BATCH, QUERY_BATCH
        )  # (N, k) uint32 points, float32 scores; NaN where fewer than k were found
        found, scores = np.asarray(found, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        valid = np.isfinite(scores)
        labels = np.where(valid, self._label_at[np.where(valid, found, 0)], -1)
        distances = scores if self.metric == "l2" else 1.0 - scores
        return labels, np.where(valid, distances, np.float32(np.inf)).astype(np.float32)
