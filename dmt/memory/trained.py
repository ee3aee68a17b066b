"""What the partitioned indexes (faiss's inverted file, ScaNN's tree) share: partitions trained on the
store's own keys, exact search until there are enough of them, and a search breadth measured on real
queries rather than guessed.

- **Exact until trained.** A store starts empty; while it holds fewer than :data:`TRAIN_MIN` keys it is
  searched exactly (the :class:`~dmt.memory.exact.ExactIndex` table these indexes extend), which at that
  size costs about what visiting partitions would. The first time it reaches that size, the partitions are
  trained on its keys and every live key is filed.
- **Labels are slots.** An eviction removes exactly the evicted slots from the native index, and a
  re-added slot leaves it first.
- **Breadth measured, not guessed.** Unless the breadth (faiss's ``nprobe``, ScaNN's
  ``leaves_to_search``) is given, the first search after each training calibrates it on that search's
  queries (at most :data:`CALIBRATION_QUERIES`): their exact top-k from the table, then the smallest
  breadth whose recall@k reaches :data:`CALIBRATION_RECALL` (a margin over the 0.95 the layers promise).
  :attr:`TrainedIndex.calibrated_recall` keeps what it measured.

The index holds nothing beyond the store's keys, so it is never saved (:attr:`has_file` False): a restored
store rebuilds it from its keys, and no native index file is ever parsed. It searches on the host;
queries from another device are copied over and the results back.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dmt.memory.exact import ExactIndex
from dmt.memory.index import HOST, merge_by_magnitude

# Live keys at which the partitions are first trained; below it every search is exact.
TRAIN_MIN = 16384
# Retrain once the live keys are this many times the count the partitions were trained on.
GROWTH = 4
# Queries (from the first search after a training) on which the breadth is calibrated, and the recall
# it seeks.
CALIBRATION_QUERIES = 512
CALIBRATION_RECALL = 0.97
# A returned key this close to the k-th exact distance is a tie, not a miss (as in dmt.memory.recall).
TIE_TOLERANCE = 1e-5


def derived_partitions(size: int, per_root: int, keys_each: int) -> int:
    """Partitions for a store of ``size`` keys: the power of two nearest ``per_root · sqrt(size)``, but at
    most the power of two that leaves every partition ``keys_each`` keys, and at least 16."""
    nearest = 2 ** round(math.log2(per_root * math.sqrt(max(1, size))))
    trainable = 2 ** int(math.log2(max(1, size // keys_each)))
    return max(16, min(nearest, trainable))


def calibrated_breadth(recall: Callable[[int], float], partitions: int) -> tuple[int, float]:
    """The smallest breadth in ``[1, partitions]`` whose ``recall(breadth)`` reaches
    :data:`CALIBRATION_RECALL` (``partitions`` when none does), and its recall: doubled from 1 until it
    reaches, then bisected between the last that missed and the first that reached."""
    missed, breadth = 0, 1
    reached = recall(breadth)
    while reached < CALIBRATION_RECALL and breadth < partitions:
        missed, breadth = breadth, min(2 * breadth, partitions)
        reached = recall(breadth)
    while reached >= CALIBRATION_RECALL and breadth - missed > 1:
        middle = (missed + breadth) // 2
        found = recall(middle)
        if found >= CALIBRATION_RECALL:
            breadth, reached = middle, found
        else:
            missed = middle
    return breadth, reached


def check_partition_settings(
    partitions_name: str, partitions: int | None, breadth_name: str, breadth: int | None
) -> None:
    """``ValueError`` naming the setting unless ``partitions`` and ``breadth`` are each None or an integer
    >= 1, and ``breadth <= partitions`` when both are given."""
    for name, value in ((partitions_name, partitions), (breadth_name, breadth)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")
    if partitions is not None and breadth is not None and breadth > partitions:
        raise ValueError(f"{breadth_name} ({breadth}) exceeds {partitions_name} ({partitions})")


class TrainedIndex(ExactIndex):
    """k-nearest search through a native index of trained partitions over labels ``0 .. capacity - 1``
    (exact search while the store is smaller than :data:`TRAIN_MIN`).

    A backend implements :meth:`train` (partitions from the live keys, every live key filed),
    :meth:`_file` (new labels into a trained index, then any retraining), :meth:`_unfile` (labels out of
    it), :meth:`_approximate` (a search at a breadth) and :attr:`partitions`.

    Args:
        breadth: partitions a query visits; None calibrates it after each training.
    """

    magnitude_searches = 2  # ranking by |q·k| searches q and -q

    def __init__(self, dim: int, metric: str, capacity: int, breadth: int | None) -> None:
        super().__init__(dim, metric, capacity)
        self.breadth_setting = breadth
        self._breadth = breadth  # None until calibrated
        self.trained_on = 0  # live keys when the partitions were last trained
        self.trainings = 0
        self.train_seconds = 0.0
        self.calibrated_recall = float("nan")

    @property
    @abstractmethod
    def trained(self) -> bool:
        """Whether the keys are filed in partitions (else every search is exact)."""

    @property
    @abstractmethod
    def partitions(self) -> int:
        """Partitions of the trained index (0 before training)."""

    @abstractmethod
    def train(self) -> None:
        """(Re)train the partitions on the live keys, file every live key and set :attr:`trained_on`;
        calls :meth:`_trained` at the end."""

    @abstractmethod
    def _file(self, labels: np.ndarray) -> None:
        """File ``labels`` (live, distinct, not filed) in the trained index, then retrain if due."""

    @abstractmethod
    def _unfile(self, labels: np.ndarray) -> None:
        """Drop ``labels`` (filed, distinct) from the trained index."""

    @abstractmethod
    def _approximate(self, queries: np.ndarray, k: int, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and distances ``(N, k)`` of the filed keys (``dmt.memory.metrics`` conventions: -1 and
        +inf padding) for host ``queries (N, D)``, normalised already for cosine, visiting ``breadth``
        partitions."""

    def to(self, device: torch.device | str) -> TrainedIndex:
        """The index stays on the host: searches copy queries from their device and back."""
        return self

    def _vectors(self, labels: np.ndarray) -> np.ndarray:
        """``(M, D)`` float32 vectors of ``labels`` as the index files them (normalised for cosine),
        read back from the table (``-scale · v`` with ``scale`` a power of two: exact)."""
        rows = self._table[torch.from_numpy(labels), : self.dim]
        return np.ascontiguousarray((rows / -self._scale).numpy())

    def _trained(self, seconds: float) -> None:
        """Book a training that took ``seconds``: the breadth is recalibrated at the next search unless it
        was given."""
        given = self.breadth_setting
        self._breadth = None if given is None else min(given, self.partitions)
        self.trainings += 1
        self.train_seconds += seconds

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        labels = self._check_labels(labels)
        readded = labels[self._live[labels]]
        super().add(labels, vectors)  # checked, and written to the table (normalised for cosine)
        if not self.trained:
            if len(self) >= TRAIN_MIN:
                self.train()
            return
        if not len(labels):
            return
        if len(readded):
            self._unfile(readded)
        self._file(labels)

    def remove(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64).ravel()
        labels = labels[(labels >= 0) & (labels < self.capacity)]
        labels = np.unique(labels[self._live[labels]])
        super().remove(labels)
        if self.trained and len(labels):
            self._unfile(labels)

    def calibrate(self, queries: np.ndarray, k: int) -> None:
        """Set the breadth to the smallest whose recall@k on ``queries (N, D)`` (at most
        :data:`CALIBRATION_QUERIES`, normalised for cosine) reaches :data:`CALIBRATION_RECALL`."""
        sample = queries[:: max(1, len(queries) // CALIBRATION_QUERIES)][:CALIBRATION_QUERIES]
        k = min(k, len(self))
        exact = super()._search_on_device(torch.from_numpy(sample), k, False)[1].numpy()  # (n, k)
        bound = exact[:, -1:] + TIE_TOLERANCE  # (n, 1): the k-th exact distance per query

        def recall(breadth: int) -> float:
            distances = self._approximate(sample, k, breadth)[1]
            return float((distances <= bound).sum() / exact.size)

        self._breadth, self.calibrated_recall = calibrated_breadth(recall, self.partitions)

    def _search_on_device(
        self, queries: torch.Tensor, k: int, by_magnitude: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.trained:  # a small store: exact
            return super()._search_on_device(queries, k, by_magnitude)
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        host = np.ascontiguousarray(queries.detach().to(HOST, torch.float32).numpy())  # (N, D)
        if self._breadth is None and len(host):
            self.calibrate(host, k)
        breadth = self._breadth or 1
        labels, distances = (torch.from_numpy(a) for a in self._approximate(host, k, breadth))
        if by_magnitude:
            negative = (torch.from_numpy(a) for a in self._approximate(-host, k, breadth))
            labels, distances = merge_by_magnitude((labels, distances), tuple(negative))
        return labels, distances

    def state(self, partitions: str, breadth: str) -> dict[str, Any]:
        """:attr:`search_state` with the partitions and breadth under the backend's own names."""
        return {
            "trained": self.trained,
            partitions: self.partitions,
            breadth: self._breadth,
            "calibrated_recall": self.calibrated_recall,
            "trainings": self.trainings,
            "train_seconds": self.train_seconds,
        }
