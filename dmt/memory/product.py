"""Product-key index (Lample et al., 2019): exact top-k over ``n²`` fixed keys for the cost of ``2n``.

Every label ``i · n + j`` owns the key ``[a_i | b_j]``, the concatenation of one sub-key from each of two
tables ``a, b (n, D/2)``. Inner products and squared L2 distances split into a sum over the two halves, so
the k best keys are among the pairs of each half's k best sub-keys: a query costs ``2 · n · D/2``
multiply-adds and a ``k × k`` merge, and the result is exact. At ``n = 1024`` (a million entries, 64-d keys)
that is 65k multiply-adds per query, against 64M for brute force.

The keys are fixed at construction (random sub-keys from a fixed seed, the same on every replica): a
store on this index is full from the start, learns by updating its values, and cannot insert or remove
entries. The sub-key tables live on the index's device (:meth:`ProductKeyIndex.to`), where searches run;
ranking by ``|q·k|`` (``ip``) scores the sub-keys once and selects the best pairs of ``q`` and of ``-q``
from those scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.memory.index import TorchKeyIndex, merge_by_magnitude

PRODUCT_METRICS = ("ip", "l2")
SUBKEY_SEED = 0


class ProductKeyIndex(TorchKeyIndex):
    """Exact k-nearest search over the ``capacity = n²`` product keys of two sub-key tables."""

    backend = "product"
    keys_are_fixed = True

    def __init__(self, dim: int, metric: str, capacity: int) -> None:
        super().__init__(dim, metric, capacity)
        self.n = self.check_shape(dim, metric, capacity)
        generator = torch.Generator().manual_seed(SUBKEY_SEED)
        # Components of variance 1/D: keys of norm ≈ 1, so q·k has the scale of the query.
        self._subkeys = torch.randn(2, self.n, dim // 2, generator=generator) / math.sqrt(dim)  # (2, n, D/2)
        self._live[:] = True

    @staticmethod
    def check_shape(dim: int, metric: str, capacity: int) -> int:
        """``n`` for a ``capacity = n²`` index of even ``dim`` and metric ip or l2; else ``ValueError``."""
        if metric not in PRODUCT_METRICS:
            raise ValueError(
                f"a product-key index needs metric ip or l2 (they split over the key halves), got {metric!r}"
            )
        if dim % 2:
            raise ValueError(f"a product-key index needs an even key dim, got {dim}")
        n = math.isqrt(capacity)
        if n * n != capacity:
            raise ValueError(
                f"a product-key index needs capacity = n² (e.g. {n**2} or {(n + 1) ** 2}), got {capacity}"
            )
        return n

    @property
    def params(self) -> dict[str, Any]:
        return {"backend": self.backend}

    @property
    def device(self) -> torch.device:
        return self._subkeys.device

    def to(self, device: torch.device | str) -> ProductKeyIndex:
        self._subkeys = self._subkeys.to(device)
        return self

    def keys(self, labels: np.ndarray) -> np.ndarray:
        """The fixed keys ``(M, D)`` float32 of ``labels (M,)``, on the host."""
        labels = torch.from_numpy(self._check_labels(labels)).to(self.device)
        keys = torch.cat([self._subkeys[0, labels // self.n], self._subkeys[1, labels % self.n]], 1)
        return keys.cpu().numpy()

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        raise ValueError(
            "a product-key index has fixed keys: entries cannot be added (update values instead)"
        )

    def remove(self, labels: np.ndarray) -> None:
        raise ValueError("a product-key index has fixed keys: entries cannot be removed")

    def _half_scores(self, queries: torch.Tensor, half: int) -> torch.Tensor:
        """``(N, n)`` score of every sub-key of one half; larger is nearer."""
        part = queries[:, half * (self.dim // 2) : (half + 1) * (self.dim // 2)]  # (N, D/2)
        dots = part @ self._subkeys[half].T  # (N, n)
        if self.metric == "ip":
            return dots
        # -(||q||² - 2 q·a + ||a||²) without the ||q||² term, added back to the final distances.
        return 2.0 * dots - self._subkeys[half].pow(2).sum(1)

    def _best_pairs(
        self, half_scores: list[torch.Tensor], squared_norms: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``(N, k)`` and distances ``(N, k)`` of the ``k`` best keys given both halves' sub-key
        scores ``(N, n)`` (larger is nearer); ``squared_norms (N, 1)`` are the queries' for l2."""
        per_half = min(k, self.n)
        best = [scores.topk(per_half, dim=1) for scores in half_scores]  # (N, k') each
        pair_scores = best[0].values[:, :, None] + best[1].values[:, None, :]  # (N, k', k')
        top = pair_scores.flatten(1).topk(k, dim=1)  # (N, k), sorted best first
        first = best[0].indices.gather(1, top.indices // per_half)
        second = best[1].indices.gather(1, top.indices % per_half)
        labels = first * self.n + second
        if squared_norms is None:  # ip
            return labels, 1.0 - top.values
        return labels, (squared_norms - top.values).clamp_min(0.0)

    def _search_on_device(
        self, queries: torch.Tensor, k: int, by_magnitude: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.capacity)
        half_scores = [self._half_scores(queries, half) for half in (0, 1)]  # (N, n) each
        squared_norms = queries.pow(2).sum(1, keepdim=True) if self.metric == "l2" else None
        labels, distances = self._best_pairs(half_scores, squared_norms, k)
        if by_magnitude:
            # -q's sub-key scores are exactly the negated ones (ip): no second matmul.
            negative = self._best_pairs([-scores for scores in half_scores], None, k)
            labels, distances = merge_by_magnitude((labels, distances), negative)
        return labels, distances

    def save(self, path: str | Path) -> None:
        """The sub-key tables ``(2, n, D/2)`` as a ``.npy`` file."""
        self._save_array(path, self._subkeys.cpu().numpy())

    @classmethod
    def load(
        cls, path: str | Path, dim: int, metric: str, capacity: int, live: np.ndarray, **_hnsw_params: Any
    ) -> ProductKeyIndex:
        index = cls(dim, metric, capacity)
        if not index._check_live(live).all():
            raise ValueError("a product-key store has every entry live; the live mask has free slots")
        subkeys = cls._load_array(path, "sub-keys", (2, index.n, dim // 2))
        index._subkeys = torch.from_numpy(subkeys)
        return index
