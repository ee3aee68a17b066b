"""Where a store's entries came from and how they were used since, per slot.

For every slot of a :class:`~dmt.memory.store.KNNStore`: the clock when its entry was stored, the references
to it since then, the MLP unit it was seeded from, the ids of the :data:`ORIGIN_SPAN` tokens ending at the
one whose query or key inserted it and the token that followed that one (-1 where unknown). A store's
per-slot bookkeeping (:class:`~dmt.memory.slots.Slots`) holds one :class:`Provenance`, from which the store
answers ``insertion_times``, ``read_counts``, ``origins`` and ``next_tokens``; a memory layer builds the
token spans it inserts with :func:`token_spans`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

# Token ids recorded per entry as its origin: the text span ending at the token that inserted it.
ORIGIN_SPAN = 8


@dataclass
class Provenance:
    """The provenance of the ``C`` slots of a store; rows of free slots hold stale values until an insert
    overwrites them. Also the store's saved arrays of the same names (:mod:`dmt.memory.persistence`)."""

    inserted_at: np.ndarray  # (C,) int64: the clock when each entry was stored
    read_count: np.ndarray  # (C,) int64: references since then
    origin_unit: np.ndarray  # (C,) int32: the MLP unit the entry was seeded from, or -1
    origin_tokens: np.ndarray  # (C, ORIGIN_SPAN) int32: token ids of the span that inserted it, or -1
    next_token: np.ndarray  # (C,) int32: the token after that span (what came next), or -1

    @staticmethod
    def empty_arrays(capacity: int) -> dict[str, np.ndarray]:
        """The arrays of ``capacity`` slots that never held an entry, by field name."""
        return {
            "inserted_at": np.zeros(capacity, dtype=np.int64),
            "read_count": np.zeros(capacity, dtype=np.int64),
            "origin_unit": np.full(capacity, -1, dtype=np.int32),
            "origin_tokens": np.full((capacity, ORIGIN_SPAN), -1, dtype=np.int32),
            "next_token": np.full(capacity, -1, dtype=np.int32),
        }

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Provenance:
        """Holding the arrays of ``arrays`` that are named as its fields (no copy); others are ignored."""
        return cls(**{field.name: arrays[field.name] for field in fields(cls)})

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays themselves (not copies), by field name."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def origins(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The origin units ``(M,)`` and token spans ``(M, ORIGIN_SPAN)`` of checked ``ids (M,)``."""
        return self.origin_unit[ids], self.origin_tokens[ids]

    def stored(
        self, slots: np.ndarray, now: int, units: np.ndarray, tokens: np.ndarray, following: np.ndarray
    ) -> None:
        """New entries in ``slots (M,)``, stored at clock ``now``, unread, from ``units (M,)``, ``tokens
        (M, ORIGIN_SPAN)`` and next tokens ``following (M,)`` (checked by :func:`origin_array`)."""
        self.inserted_at[slots] = now
        self.read_count[slots] = 0
        self.origin_unit[slots], self.origin_tokens[slots] = units, tokens
        self.next_token[slots] = following

    def read(self, ids: np.ndarray) -> None:
        """One reference to each of the live ``ids (M,)``; duplicates each count."""
        np.add.at(self.read_count, ids, 1)

    def merged(self, target: int, others: np.ndarray) -> None:
        """``others (m,)`` folded into ``target``: their read counts add up, the target keeps its insertion
        time and origin."""
        self.read_count[target] += self.read_count[others].sum()


def origin_array(name: str, origins: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``origins`` checked as ``shape`` integers in ``[-1, 2**31)``, as int32; None gives all -1."""
    if origins is None:
        return np.full(shape, -1, dtype=np.int32)
    origins = np.asarray(origins)
    if origins.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {origins.shape}")
    if origins.size and origins.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {origins.dtype}")
    if origins.size and (origins.min() < -1 or origins.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} must lie in [-1, 2**31), got [{origins.min()}, {origins.max()}]")
    return origins.astype(np.int32)


def token_spans(token_ids: np.ndarray, batch: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``(M, ORIGIN_SPAN)`` int32 origin tokens: the ids of ``token_ids (B, T)`` in row ``batch[m]`` from
    ``position[m] - ORIGIN_SPAN + 1`` to ``position[m]``, left-padded with -1 before the sequence start.

    ``batch``, ``position``: ``(M,)`` integers indexing ``token_ids``.
    """
    padded = np.full((token_ids.shape[0], token_ids.shape[1] + ORIGIN_SPAN - 1), -1, dtype=np.int32)
    padded[:, ORIGIN_SPAN - 1 :] = token_ids  # padded column p holds token p - ORIGIN_SPAN + 1
    columns = np.asarray(position)[:, None] + np.arange(ORIGIN_SPAN)  # (M, S)
    return padded[np.asarray(batch)[:, None], columns]
