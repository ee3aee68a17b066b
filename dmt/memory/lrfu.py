"""LRFU replacement policy (Lee et al., 2001) over a fixed number of slots.

Every reference at time ``t_i`` contributes ``F(t - t_i)`` to a slot's *combined recency and frequency*
``CRF(t) = Σ_i F(t - t_i)`` with ``F(x) = (1/2)^(λx)``. Because ``F(a + b) = F(a) F(b)`` the sum can be
kept incrementally: a reference at time ``t`` sets ``crf = F(0) + F(t - last) · crf`` and ``last = t``.
``λ = 0`` makes CRF the reference count (LFU); ``λ = 1`` makes the most recent reference outweigh all
older ones together (LRU order).
"""

from __future__ import annotations

import numpy as np


def _check_lambda(lam: float) -> float:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return float(lam)


class LRFU:
    """Vectorised LRFU bookkeeping for slots ``0 .. capacity - 1``.

    Attributes:
        crf: ``(capacity,)`` float64 — CRF as of each slot's ``last`` reference (0 for unused slots).
        last: ``(capacity,)`` int64 — time of each slot's last reference.
    """

    def __init__(self, capacity: int, lam: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.lam = _check_lambda(lam)
        self.crf = np.zeros(capacity, dtype=np.float64)
        self.last = np.zeros(capacity, dtype=np.int64)

    def _decay(self, elapsed: np.ndarray) -> np.ndarray:
        """``F(elapsed) = 2^(-λ·elapsed)`` for ``elapsed (M,)`` time steps."""
        return np.exp2(-self.lam * elapsed)

    def reference(self, slots: np.ndarray, now: int) -> None:
        """Record one reference at ``now`` per element of ``slots (M,)``; duplicates each count."""
        uniq, counts = np.unique(np.asarray(slots, dtype=np.int64).ravel(), return_counts=True)
        # c references at the same instant add c·F(0) = c on top of the decayed old CRF.
        self.crf[uniq] = counts + self._decay(now - self.last[uniq]) * self.crf[uniq]
        self.last[uniq] = now

    def reset(self, slots: np.ndarray, now: int) -> None:
        """Start fresh entries in ``slots (M,)``: a single reference at ``now``."""
        slots = np.asarray(slots, dtype=np.int64)
        self.crf[slots] = 1.0
        self.last[slots] = now

    def score(self, slots: np.ndarray, now: int) -> np.ndarray:
        """``log2 CRF(now)`` of ``slots (M,)`` → ``(M,)`` float64.

        Working in log space keeps scores comparable after ``F(now - last)`` would underflow to 0.
        Unused slots (``crf == 0``) score ``-inf``.
        """
        slots = np.asarray(slots, dtype=np.int64)
        with np.errstate(divide="ignore"):
            return np.log2(self.crf[slots]) - self.lam * (now - self.last[slots])

    def victims(self, candidates: np.ndarray, n: int, now: int) -> np.ndarray:
        """The ``n`` candidates with the lowest CRF as of ``now`` → ``(n,)`` int64 slot ids.

        Args:
            candidates: ``(capacity,)`` bool mask or ``(M,)`` slot ids to choose from.
        Ties are broken by older ``last``, then lower slot id, so the choice is deterministic.
        """
        candidates = np.asarray(candidates)
        slots = np.flatnonzero(candidates) if candidates.dtype == bool else candidates.astype(np.int64)
        if not 0 <= n <= len(slots):
            raise ValueError(f"cannot choose n={n} victims among {len(slots)} candidates")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        score = self.score(slots, now)
        if n < len(slots):
            # O(M) pre-selection; keep everything tied with the n-th score so tie-breaking stays exact.
            cutoff = np.partition(score, n - 1)[n - 1]
            keep = score <= cutoff
            slots, score = slots[keep], score[keep]
        order = np.lexsort((slots, self.last[slots], score))
        return slots[order[:n]]

    def merge(self, into_slot: int, from_slots: np.ndarray) -> None:
        """Fold the reference histories of ``from_slots (M,)`` into ``into_slot`` and clear them.

        All CRFs are first decayed to the latest ``last`` among them, where they simply add up.
        """
        others = np.setdiff1d(np.asarray(from_slots, dtype=np.int64), [into_slot])
        members = np.concatenate(([into_slot], others))
        common = self.last[members].max()
        self.crf[into_slot] = np.sum(self.crf[members] * self._decay(common - self.last[members]))
        self.last[into_slot] = common
        self.crf[others] = 0.0
        self.last[others] = 0

    def state_dict(self) -> dict[str, np.ndarray | float]:
        """Plain-numpy state: ``crf (capacity,)``, ``last (capacity,)`` and ``lam``."""
        return {"crf": self.crf.copy(), "last": self.last.copy(), "lam": self.lam}

    def load_state_dict(self, state: dict[str, np.ndarray | float]) -> None:
        """Restore :meth:`state_dict` output; shapes must match this policy's capacity."""
        crf = np.asarray(state["crf"], dtype=np.float64)
        last = np.asarray(state["last"], dtype=np.int64)
        for name, array in (("crf", crf), ("last", last)):
            if array.shape != (self.capacity,):
                raise ValueError(f"LRFU state {name!r} has shape {array.shape}, expected ({self.capacity},)")
        self.lam = _check_lambda(float(state["lam"]))
        self.crf, self.last = crf.copy(), last.copy()
