"""faiss inverted-file index (``IndexIVFFlat``): the store's keys filed under their nearest of ``nlist``
k-means centroids, a query ranking exactly the keys of its ``nprobe`` nearest lists.

faiss does the work this module would otherwise write by hand: k-means training, filing, the scan of the
probed lists (SIMD, threaded over queries), and add/remove by id. This wrapper adds what a memory layer
needs around it, as every partitioned index does (:mod:`dmt.memory.trained`: exact until trained, slots as
labels, ``nprobe`` calibrated on real queries, never saved), plus:

- **Ids are slots.** faiss ids are the store's labels, with a hash-table direct map, so an eviction
  removes exactly the evicted slots (``remove_ids``) and a re-added slot leaves its old list first.
- **Retraining.** The centroids are retrained from the live keys (:meth:`FaissIndex.train`) when the store
  has grown :data:`~dmt.memory.trained.GROWTH` times past the size they were trained at (``nlist`` follows
  ``4 · sqrt(size)``), or when the keys have drifted: the mean quantisation error of newly added keys (a
  running average over a sample of each add) exceeds :data:`DRIFT` times the error at training (a key
  projection that moved), once keys numbering :data:`DRIFT_TURNOVER` of the trained size have been added
  since. Keys a layer inserts because they are novel lie far from the stored ones by that very rule, so
  their error alone would retrain a large store every few steps; the turnover bounds retraining to once
  per that share of the store replaced.
  A retraining costs one k-means on at most ``SAMPLE_PER_LIST · nlist`` keys plus re-filing every live key
  (:attr:`FaissIndex.train_seconds` accumulates it).
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from dmt.memory.trained import GROWTH, TrainedIndex, check_partition_settings, derived_partitions

# Training sample: at most this many keys per list (faiss warns below 39).
SAMPLE_PER_LIST = 64
# Retrain once new keys sit this many times farther from their centroids than the training keys did ...
DRIFT = 1.5
# ... once keys numbering this share of the trained size have been added since the training.
DRIFT_TURNOVER = 0.25
# Added keys per add whose quantisation error feeds the drift average, and that average's weight.
DRIFT_SAMPLE = 256
DRIFT_MOMENTUM = 0.9
SEED = 0


def derived_nlist(size: int) -> int:
    """Lists for a store of ``size`` keys: the power of two nearest ``4 · sqrt(size)`` (the low end of
    faiss's guideline, 4 to 16 · sqrt(N)), at most one per :data:`SAMPLE_PER_LIST` keys, at least 16."""
    return derived_partitions(size, 4, SAMPLE_PER_LIST)


class FaissIndex(TrainedIndex):
    """k-nearest search through a faiss ``IndexIVFFlat`` over labels ``0 .. capacity - 1`` (exact search
    while the store is smaller than :data:`~dmt.memory.trained.TRAIN_MIN`).

    Args:
        nlist: inverted lists (k-means centroids); None derives it from the live size at each training
            (:func:`derived_nlist`).
        nprobe: lists a query visits; None calibrates it after each training for recall@k >=
            :data:`~dmt.memory.trained.CALIBRATION_RECALL` on real queries.
    """

    backend = "faiss"

    def __init__(
        self, dim: int, metric: str, capacity: int, nlist: int | None = None, nprobe: int | None = None
    ) -> None:
        self.check_settings(nlist, nprobe)
        super().__init__(dim, metric, capacity, breadth=nprobe)
        self.nlist_setting = nlist
        self._ivf: faiss.IndexIVFFlat | None = None
        self.added_since = 0  # keys added since the last training
        self._trained_error = 0.0  # mean quantisation error of the training sample
        self._recent_error = 0.0  # running mean over keys added since

    @staticmethod
    def check_settings(nlist: int | None, nprobe: int | None) -> None:
        """``ValueError`` naming ``nlist`` or ``nprobe`` unless each is None or an integer >= 1 (and
        ``nprobe <= nlist`` when both are given)."""
        check_partition_settings("nlist", nlist, "nprobe", nprobe)

    @property
    def params(self) -> dict[str, Any]:
        return {"backend": self.backend, "nlist": self.nlist_setting, "nprobe": self.breadth_setting}

    @property
    def trained(self) -> bool:
        return self._ivf is not None

    @property
    def partitions(self) -> int:
        return 0 if self._ivf is None else int(self._ivf.nlist)

    @property
    def nlist(self) -> int:
        """Inverted lists of the trained index (0 before training)."""
        return self.partitions

    @property
    def filed_entries(self) -> int:
        """Keys in the inverted lists (every live key once trained, 0 before)."""
        return 0 if self._ivf is None else int(self._ivf.ntotal)

    @property
    def nprobe(self) -> int | None:
        """Lists a query visits (None until calibrated, and before training)."""
        return self._breadth

    @property
    def search_state(self) -> dict[str, Any]:
        return self.state("nlist", "nprobe")

    def _file(self, labels: np.ndarray) -> None:
        filed = self._vectors(labels)
        self._ivf.add_with_ids(filed, labels)
        self._track_drift(filed)
        self.added_since += len(labels)
        drifted = self._recent_error > DRIFT * self._trained_error
        if len(self) >= GROWTH * self.trained_on or (
            drifted and self.added_since >= DRIFT_TURNOVER * self.trained_on
        ):
            self.train()

    def _unfile(self, labels: np.ndarray) -> None:
        """Drop ``labels`` (filed, distinct) from the inverted lists through the direct map."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        self._ivf.remove_ids(faiss.IDSelectorArray(len(labels), faiss.swig_ptr(labels)))

    def _quantisation_error(self, vectors: np.ndarray) -> float:
        """Mean distance of ``vectors (M, D)`` to their nearest centroid."""
        scores, _ = self._ivf.quantizer.search(vectors, 1)
        errors = scores[:, 0] if self.metric == "l2" else 1.0 - scores[:, 0]
        return float(errors.mean())

    def _track_drift(self, filed: np.ndarray) -> None:
        """Fold a sample of newly filed keys into the running quantisation error."""
        sample = filed[:: max(1, len(filed) // DRIFT_SAMPLE)]
        error = self._quantisation_error(sample)
        self._recent_error = DRIFT_MOMENTUM * self._recent_error + (1 - DRIFT_MOMENTUM) * error

    def train(self) -> None:
        """(Re)train the centroids on the live keys and file every live key; nprobe is recalibrated at
        the next search unless it was given."""
        started = time.perf_counter()
        live = np.flatnonzero(self._live)
        nlist = self.nlist_setting or derived_nlist(len(live))
        rng = np.random.default_rng(SEED)
        sample = np.sort(rng.choice(live, min(len(live), SAMPLE_PER_LIST * nlist), replace=False))
        faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss_metric)  # keeps `quantizer` alive
        ivf.cp.seed = SEED
        training = self._vectors(sample)
        ivf.train(training)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.add_with_ids(self._vectors(live), live)
        self._ivf, self.trained_on, self.added_since = ivf, len(live), 0
        self._trained_error = self._recent_error = self._quantisation_error(training)
        self._trained(time.perf_counter() - started)

    def _approximate(self, queries: np.ndarray, k: int, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        self._ivf.nprobe = breadth
        scores, labels = self._ivf.search(queries, k)
        distances = scores if self.metric == "l2" else 1.0 - scores
        return labels, np.where(labels >= 0, distances, np.float32(np.inf)).astype(np.float32)
