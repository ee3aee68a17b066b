"""The per-slot bookkeeping of a :class:`~dmt.memory.store.KNNStore`: which of its slots hold an entry, their
LRFU state on the store's clock and their provenance (:mod:`dmt.memory.provenance`).

The clock counts the queries referenced so far (:meth:`Slots.reference`); an entry is stored at the current
time, and eviction victims are scored at it (:mod:`dmt.memory.eviction`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dmt.memory.base import check_ids
from dmt.memory.eviction import choose_victims
from dmt.memory.lrfu import LRFU
from dmt.memory.provenance import Provenance


class Slots:
    """Bookkeeping of slots ``0 .. C - 1``, holding the arrays it is given (no copy).

    Args:
        arrays: the ``(C, ...)`` arrays by :data:`~dmt.memory.state.SLOT_ARRAYS` name (``live``, LRFU
            ``lrfu_crf``/``lrfu_last``, the :class:`~dmt.memory.provenance.Provenance` fields).
        lrfu_lambda: the LRFU λ.
        now: the clock.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], lrfu_lambda: float, now: int) -> None:
        self.live = arrays["live"]  # (C,) bool: which slots hold an entry
        self.lrfu = LRFU(len(self.live), lrfu_lambda)
        self.lrfu.crf, self.lrfu.last = arrays["lrfu_crf"], arrays["lrfu_last"]
        self.provenance = Provenance.of(arrays)
        self.now = now

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays themselves (not copies), by :data:`~dmt.memory.state.SLOT_ARRAYS` name."""
        lrfu = {"lrfu_crf": self.lrfu.crf, "lrfu_last": self.lrfu.last}
        return {"live": self.live, **lrfu, **self.provenance.arrays()}

    def is_live(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` bool: which of the checked ``ids (M,)`` name live entries (-1 never does)."""
        live = ids >= 0
        live[live] = self.live[ids[live]]
        return live

    def check_live(self, ids: np.ndarray, operation: str) -> np.ndarray:
        """``ids`` as flat int64, raising ``ValueError`` unless every one names a live entry."""
        ids = check_ids(ids, len(self.live))
        if not self.is_live(ids).all():
            raise ValueError(f"{operation}() needs ids of live entries")
        return ids

    def choose(self, n: int, eviction: str, inserts: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots for ``n <= C`` new entries: free slots ``(F,)`` (lowest first), then ``(n - F,)`` live
        victims of the ``eviction`` policy (``inserts``: the store's insert count, seeding ``random``)."""
        # Free slots are derived from the live mask (O(capacity), like the victim scan) so they can
        # never disagree with it.
        free = np.flatnonzero(~self.live)[:n]
        inserted_at = self.provenance.inserted_at
        return free, choose_victims(
            eviction, self.live, n - len(free), self.lrfu, inserted_at, self.now, inserts
        )

    def stored(self, slots: np.ndarray, units: np.ndarray, tokens: np.ndarray, following: np.ndarray) -> None:
        """New entries in ``slots (M,)`` from ``units (M,)``, ``tokens (M, ORIGIN_SPAN)`` and next tokens
        ``following (M,)``: live, stored now with a single LRFU reference, unread."""
        self.live[slots] = True
        self.provenance.stored(slots, self.now, units, tokens, following)
        self.lrfu.reset(slots, self.now)

    def reference(self, rows: np.ndarray) -> int:
        """The references of checked ids ``rows (N, k)`` (-1 padding), row ``n`` at tick ``now + n + 1``; the
        clock ends at ``now + N``. Returns how many named live entries (those counted)."""
        ids = rows.ravel()  # (N·k,)
        ticks = self.now + 1 + np.repeat(np.arange(len(rows)), rows.shape[1])  # (N·k,)
        referenced = self.is_live(ids)
        self.lrfu.reference(ids[referenced], ticks[referenced])
        self.provenance.read(ids[referenced])
        self.now += len(rows)
        return int(np.count_nonzero(referenced))

    def merged(self, target: int, others: np.ndarray) -> None:
        """``others (m,)`` folded into ``target``: LRFU histories and read counts add up (the caller frees
        the others' slots)."""
        self.lrfu.merge(target, others)
        self.provenance.merged(target, others)
