"""faiss inverted-file index (``IndexIVFFlat``): the store's keys filed under their nearest of ``nlist``
k-means centroids, a query ranking exactly the keys of its ``nprobe`` nearest lists.

faiss does the work this module would otherwise write by hand: k-means training, filing, the scan of the
probed lists (SIMD, threaded over queries), and add/remove by id. This wrapper adds what a memory layer
needs around it:

- **Exact until trained.** A store starts empty; while it holds fewer than :data:`TRAIN_MIN` keys it is
  searched exactly (the :class:`~dmt.memory.exact.ExactIndex` table this index extends), which at that
  size costs about what probing lists would. The first time it reaches that size, the quantiser is trained
  on its keys and every live key is filed.
- **Ids are slots.** faiss ids are the store's labels, with a hash-table direct map, so an eviction
  removes exactly the evicted slots (``remove_ids``) and a re-added slot leaves its old list first.
- **Retraining.** The centroids are retrained from the live keys (:meth:`FaissIndex.train`) when the store
  has grown :data:`GROWTH` times past the size they were trained at (``nlist`` follows ``4 · sqrt(size)``),
  or when the keys have drifted: the mean quantisation error of newly added keys (a running average over
  a sample of each add) exceeds :data:`DRIFT` times the error at training (a key projection that moved),
  once keys numbering :data:`DRIFT_TURNOVER` of the trained size have been added since. Keys a layer
  inserts because they are novel lie far from the stored ones by that very rule, so their error alone
  would retrain a large store every few steps; the turnover bounds retraining to once per that share of
  the store replaced.
  A retraining costs one k-means on at most ``SAMPLE_PER_LIST · nlist`` keys plus re-filing every live key
  (:attr:`FaissIndex.train_seconds` accumulates it).
- **nprobe measured, not guessed.** Unless ``nprobe`` is given, the first search after each training
  calibrates it on that search's queries (at most :data:`CALIBRATION_QUERIES`): their exact top-k from
  the table, then the smallest power of two whose recall@k reaches :data:`CALIBRATION_RECALL` (a margin
  over the 0.95 the layers promise). :attr:`FaissIndex.calibrated_recall` keeps what it measured.

The index holds nothing beyond the store's keys, so it is never saved (:attr:`has_file` False): a restored
store rebuilds it from its keys, and no native index file is ever parsed. It searches on the host (the
faiss-cpu build); queries from another device are copied over and the results back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import torch

from dmt.memory.exact import ExactIndex
from dmt.memory.index import HOST, merge_by_magnitude

# Live keys at which the quantiser is first trained; below it every search is exact.
TRAIN_MIN = 16384
# Training sample: at most this many keys per list (faiss warns below 39).
SAMPLE_PER_LIST = 64
# Retrain once the live keys are this many times the count the centroids were trained on ...
GROWTH = 4
# ... or once new keys sit this many times farther from their centroids than the training keys did.
DRIFT = 1.5
# ... once keys numbering this share of the trained size have been added since the training.
DRIFT_TURNOVER = 0.25
# Added keys per add whose quantisation error feeds the drift average, and that average's weight.
DRIFT_SAMPLE = 256
DRIFT_MOMENTUM = 0.9
# Queries (from the first search after a training) on which nprobe is calibrated, and the recall it seeks.
CALIBRATION_QUERIES = 512
CALIBRATION_RECALL = 0.97
# A returned key this close to the k-th exact distance is a tie, not a miss (as in dmt.memory.recall).
TIE_TOLERANCE = 1e-5
SEED = 0


def derived_nlist(size: int) -> int:
    """Lists for a store of ``size`` keys: the power of two nearest ``4 · sqrt(size)`` (the low end of
    faiss's guideline, 4 to 16 · sqrt(N)), but at most the power of two that leaves every list
    :data:`SAMPLE_PER_LIST` training keys, and at least 16."""
    nearest = 2 ** round(math.log2(4 * math.sqrt(max(1, size))))
    trainable = 2 ** int(math.log2(max(1, size // SAMPLE_PER_LIST)))
    return max(16, min(nearest, trainable))


def calibrated_nprobe(recall: Callable[[int], float], nlist: int) -> tuple[int, float]:
    """The smallest nprobe in ``[1, nlist]`` whose ``recall(nprobe)`` reaches :data:`CALIBRATION_RECALL`
    (``nlist`` when none does), and its recall: doubled from 1 until it reaches, then bisected between
    the last that missed and the first that reached."""
    missed, nprobe = 0, 1
    reached = recall(nprobe)
    while reached < CALIBRATION_RECALL and nprobe < nlist:
        missed, nprobe = nprobe, min(2 * nprobe, nlist)
        reached = recall(nprobe)
    while reached >= CALIBRATION_RECALL and nprobe - missed > 1:
        middle = (missed + nprobe) // 2
        found = recall(middle)
        if found >= CALIBRATION_RECALL:
            nprobe, reached = middle, found
        else:
            missed = middle
    return nprobe, reached


class FaissIndex(ExactIndex):
    """k-nearest search through a faiss ``IndexIVFFlat`` over labels ``0 .. capacity - 1`` (exact search
    while the store is smaller than :data:`TRAIN_MIN`).

    Args:
        nlist: inverted lists (k-means centroids); None derives it from the live size at each training
            (:func:`derived_nlist`).
        nprobe: lists a query visits; None calibrates it after each training for recall@k >=
            :data:`CALIBRATION_RECALL` on real queries.
    """

    backend = "faiss"
    magnitude_searches = 2  # ranking by |q·k| searches q and -q

    def __init__(
        self, dim: int, metric: str, capacity: int, nlist: int | None = None, nprobe: int | None = None
    ) -> None:
        self.check_settings(nlist, nprobe)
        super().__init__(dim, metric, capacity)
        self.nlist_setting, self.nprobe_setting = nlist, nprobe
        self._ivf: faiss.IndexIVFFlat | None = None
        self._nprobe = nprobe  # None until calibrated
        self.trained_on = 0  # live keys when the centroids were last trained
        self.added_since = 0  # keys added since
        self.trainings = 0
        self.train_seconds = 0.0
        self.calibrated_recall = float("nan")
        self._trained_error = 0.0  # mean quantisation error of the training sample
        self._recent_error = 0.0  # running mean over keys added since

    @staticmethod
    def check_settings(nlist: int | None, nprobe: int | None) -> None:
        """``ValueError`` naming ``nlist`` or ``nprobe`` unless each is None or an integer >= 1 (and
        ``nprobe <= nlist`` when both are given)."""
        for name, value in (("nlist", nlist), ("nprobe", nprobe)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")
        if nlist is not None and nprobe is not None and nprobe > nlist:
            raise ValueError(f"nprobe ({nprobe}) exceeds nlist ({nlist})")

    @property
    def params(self) -> dict[str, Any]:
        return {"backend": self.backend, "nlist": self.nlist_setting, "nprobe": self.nprobe_setting}

    @property
    def trained(self) -> bool:
        """Whether the keys are filed in inverted lists (else every search is exact)."""
        return self._ivf is not None

    @property
    def nlist(self) -> int:
        """Inverted lists of the trained index (0 before training)."""
        return 0 if self._ivf is None else int(self._ivf.nlist)

    @property
    def filed_entries(self) -> int:
        """Keys in the inverted lists (every live key once trained, 0 before)."""
        return 0 if self._ivf is None else int(self._ivf.ntotal)

    @property
    def nprobe(self) -> int | None:
        """Lists a query visits (None until calibrated, and before training)."""
        return self._nprobe

    @property
    def search_state(self) -> dict[str, Any]:
        return {
            "trained": self.trained,
            "nlist": self.nlist,
            "nprobe": self._nprobe,
            "calibrated_recall": self.calibrated_recall,
            "trainings": self.trainings,
            "train_seconds": self.train_seconds,
        }

    def to(self, device: torch.device | str) -> FaissIndex:
        """The index stays on the host (faiss-cpu): searches copy queries from their device and back."""
        return self

    def _vectors(self, labels: np.ndarray) -> np.ndarray:
        """``(M, D)`` float32 vectors of ``labels`` as the index files them (normalised for cosine),
        read back from the table (``-scale · v`` with ``scale`` a power of two: exact)."""
        rows = self._table[torch.from_numpy(labels), : self.dim]
        return np.ascontiguousarray((rows / -self._scale).numpy())

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        labels = self._check_labels(labels)
        readded = labels[self._live[labels]]
        super().add(labels, vectors)  # checked, and written to the table (normalised for cosine)
        if self._ivf is None:
            if len(self) >= TRAIN_MIN:
                self.train()
            return
        if not len(labels):
            return
        if len(readded):
            self._remove_ids(readded)
        filed = self._vectors(labels)
        self._ivf.add_with_ids(filed, labels)
        self._track_drift(filed)
        self.added_since += len(labels)
        drifted = self._recent_error > DRIFT * self._trained_error
        if len(self) >= GROWTH * self.trained_on or (
            drifted and self.added_since >= DRIFT_TURNOVER * self.trained_on
        ):
            self.train()

    def remove(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64).ravel()
        labels = labels[(labels >= 0) & (labels < self.capacity)]
        labels = np.unique(labels[self._live[labels]])
        super().remove(labels)
        if self._ivf is not None and len(labels):
            self._remove_ids(labels)

    def _remove_ids(self, labels: np.ndarray) -> None:
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
        self._nprobe = None if self.nprobe_setting is None else min(self.nprobe_setting, nlist)
        self.trainings += 1
        self.train_seconds += time.perf_counter() - started

    def _faiss_search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and distances ``(N, k)`` of the filed keys (``dmt.memory.metrics`` conventions: -1 and
        +inf padding) for host ``queries (N, D)``, normalised already for cosine."""
        self._ivf.nprobe = nprobe
        scores, labels = self._ivf.search(queries, k)
        distances = scores if self.metric == "l2" else 1.0 - scores
        return labels, np.where(labels >= 0, distances, np.float32(np.inf)).astype(np.float32)

    def calibrate(self, queries: np.ndarray, k: int) -> None:
        """Set nprobe to the smallest whose recall@k on ``queries (N, D)`` (at most
        :data:`CALIBRATION_QUERIES`, normalised for cosine) reaches :data:`CALIBRATION_RECALL`: doubled
        from 1 until it does, then bisected between the last that missed and the first that reached."""
        sample = queries[:: max(1, len(queries) // CALIBRATION_QUERIES)][:CALIBRATION_QUERIES]
        k = min(k, len(self))
        exact = super()._search_on_device(torch.from_numpy(sample), k, False)[1].numpy()  # (n, k)
        bound = exact[:, -1:] + TIE_TOLERANCE  # (n, 1): the k-th exact distance per query

        def recall(nprobe: int) -> float:
            distances = self._faiss_search(sample, k, nprobe)[1]
            return float((distances <= bound).sum() / exact.size)

        self._nprobe, self.calibrated_recall = calibrated_nprobe(recall, self.nlist)

    def _search_on_device(
        self, queries: torch.Tensor, k: int, by_magnitude: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ivf is None:  # a small store: exact
            return super()._search_on_device(queries, k, by_magnitude)
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        host = np.ascontiguousarray(queries.detach().to(HOST, torch.float32).numpy())  # (N, D)
        if self._nprobe is None and len(host):
            self.calibrate(host, k)
        labels, distances = (torch.from_numpy(a) for a in self._faiss_search(host, k, self._nprobe or 1))
        if by_magnitude:
            negative = (torch.from_numpy(a) for a in self._faiss_search(-host, k, self._nprobe or 1))
            labels, distances = merge_by_magnitude((labels, distances), tuple(negative))
        return labels, distances
