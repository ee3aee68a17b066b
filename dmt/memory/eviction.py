"""Which live entries a full store evicts: LRFU (the default), FIFO or uniformly random victims.

Every choice is a function of the store's own state (its LRFU bookkeeping, insertion times, clock and
insert count), never of a global random state: data-parallel replicas that apply the same writes evict
the same slots, and a save/load round trip leaves later choices unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dmt.memory.lrfu import LRFU

EVICTIONS: tuple[str, ...] = ("lrfu", "fifo", "random")


def check_eviction(eviction: str) -> str:
    """Return ``eviction`` if it names a policy, else raise a ``ValueError`` naming the choices."""
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
    return eviction


def lowest(slots: np.ndarray, n: int, score: np.ndarray, *ties: np.ndarray) -> np.ndarray:
    """The ``n`` of ``slots (M,)`` with the lowest ``score (M,)`` → ``(n,)`` int64, lowest first.

    Ties are broken by each of ``ties`` (``(M,)`` each, lowest first) in turn, then by lower slot id, so
    the choice is deterministic.
    """
    if not 0 <= n <= len(slots):
        raise ValueError(f"cannot choose n={n} victims among {len(slots)} candidates")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    chosen = np.arange(len(slots)) if n == len(slots) else smallest(n, (score, *ties, slots))
    order = np.lexsort((slots[chosen], *(tie[chosen] for tie in reversed(ties)), score[chosen]))
    return slots[chosen[order]].astype(np.int64)


def smallest(n: int, keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """Positions of the ``n`` smallest rows (``0 < n < M``) in the lexicographic order of ``keys`` (``(M,)``
    each, most significant first, the last one distinct), in no particular order.

    One selection per key, over the rows still tied: those below the n-th value are in, those equal to
    it go on to the next key. ``torch.topk`` selects in O(M) also among many equal values (LFU scores
    are mostly ties), where ``np.partition`` slows down a hundredfold.
    """
    candidates = np.arange(len(keys[0]))  # (M,) rows not yet decided
    chosen = []
    for key in keys:
        values = key[candidates]
        nth = torch.topk(torch.from_numpy(values), n, largest=False, sorted=False).values.max().item()
        below = values < nth
        chosen.append(candidates[below])
        n -= int(np.count_nonzero(below))
        candidates = candidates[values == nth]
        if len(candidates) == n:  # every row tied at the n-th value is in (always so at the distinct key)
            break
    return np.concatenate([*chosen, candidates])


def choose_victims(
    eviction: str,
    live: np.ndarray,
    n: int,
    lrfu: LRFU,
    inserted_at: np.ndarray,
    now: int,
    inserts: int,
) -> np.ndarray:
    """``n`` distinct live slots to evict → ``(n,)`` int64.

    Args:
        eviction: ``lrfu`` (lowest CRF as of ``now``, see :class:`dmt.memory.lrfu.LRFU`), ``fifo`` (earliest
            ``inserted_at``, then lower slot) or ``random`` (uniform, from a generator seeded with ``now``
            and the store's ``inserts`` count, so two inserts never share a draw).
        live: ``(capacity,)`` bool mask of the candidates.
        inserted_at: ``(capacity,)`` int64 clock at which each slot's entry was stored.
    """
    if eviction == "lrfu":
        return lrfu.victims(live, n, now)
    slots = np.flatnonzero(live)
    if eviction == "fifo":
        return lowest(slots, n, inserted_at[slots])
    return np.random.default_rng((now, inserts)).choice(slots, n, replace=False).astype(np.int64)
