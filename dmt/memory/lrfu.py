"""LRFU replacement policy (Lee et al., 2001) over a fixed number of slots.

Every reference at time ``t_i`` contributes ``F(t - t_i)`` to a slot's *combined recency and frequency*
``CRF(t) = Σ_i F(t - t_i)`` with ``F(x) = (1/2)^(λx)``. Because ``F(a + b) = F(a) F(b)`` the sum can be
kept incrementally: a reference at time ``t`` sets ``crf = F(0) + F(t - last) · crf`` and ``last = t``.
``λ = 0`` makes CRF the reference count (LFU); ``λ = 1`` makes the most recent reference outweigh all
older ones together (LRU order). As in the paper, time counts references: a store advances its clock by
one per query it references, so λ = 1 orders entries by their last query even within one batch.
"""

from __future__ import annotations

import numpy as np

from dmt.memory.eviction import lowest


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

    def reference(self, slots: np.ndarray, times: int | np.ndarray) -> None:
        """Record one reference per element of ``slots (M,)`` at ``times`` (an int, or ``(M,)`` ints, each
        at least the slot's ``last``); duplicates each count.

        Equivalent to applying the references one at a time in time order. Per slot, the references are
        folded relative to the slot's latest time ``t``: ``crf = Σ_i F(t - t_i) + F(t - last) · crf``.
        """
        slots = np.asarray(slots, dtype=np.int64).ravel()
        times = np.broadcast_to(np.asarray(times, dtype=np.int64), slots.shape)
        if not slots.size:
            return
        if self.lam == 0.0:  # F = 1: each reference adds 1 whenever it came, no sort needed (LFU)
            np.add.at(self.crf, slots, 1.0)
            np.maximum.at(self.last, slots, times)
            return
        start, span = int(times.min()), int(times.max() - times.min()) + 1
        if self.capacity * span >= 2**63:
            raise ValueError(f"references spanning {span} time steps are too many to sort at once")
        # One sort of a combined key orders by slot, then time (cheaper than lexsort's sort per key).
        key = np.sort(slots * span + (times - start))
        slots, times = key // span, key % span + start
        first = np.flatnonzero(np.diff(slots, prepend=-1))  # (U,) where each slot's run starts
        counts = np.diff(first, append=len(slots))  # (U,)
        uniq, latest = slots[first], times[first + counts - 1]  # (U,) each slot and its last time
        fresh = np.add.reduceat(self._decay(np.repeat(latest, counts) - times), first)  # (U,)
        self.crf[uniq] = fresh + self._decay(latest - self.last[uniq]) * self.crf[uniq]
        self.last[uniq] = latest

    def reset(self, slots: np.ndarray, now: int) -> None:
        """Start fresh entries in ``slots (M,)``: a single reference at ``now``."""
        slots = np.asarray(slots, dtype=np.int64)
        self.crf[slots] = 1.0
        self.last[slots] = now

    def crf_at(self, slots: np.ndarray, now: int) -> np.ndarray:
        """``CRF(now)`` of ``slots (M,)`` → ``(M,)`` float64 (0 for unused slots; may underflow to 0 for
        slots not referenced in a long time, where :meth:`score` still ranks them)."""
        slots = np.asarray(slots, dtype=np.int64)
        return self.crf[slots] * self._decay(now - self.last[slots])

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
        return lowest(slots, n, self.score(slots, now), self.last[slots])

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
