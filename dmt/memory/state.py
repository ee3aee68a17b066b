"""What a :class:`~dmt.memory.store.KNNStore` is made of, as its persistence takes it apart and puts it back.

- :class:`StoreSettings`: what a store is built with, as :func:`check_settings` checked it;
- :class:`StoreState`: a store's whole state, read with :meth:`KNNStore.state
  <dmt.memory.store.KNNStore.state>` and held by :meth:`KNNStore.from_state
  <dmt.memory.store.KNNStore.from_state>`;
- :func:`empty_slots` and :func:`empty_state`: the per-slot arrays (:data:`SLOT_ARRAYS`) and the state of
  a new store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from dmt.memory.base import MemoryStats
from dmt.memory.eviction import check_eviction
from dmt.memory.index import KeyIndex
from dmt.memory.metrics import Metric, check_metric
from dmt.memory.provenance import Provenance

VALUE_DTYPES = ("float32", "float16")
# The per-slot arrays of a store, by name: its live mask, its LRFU state (dmt.memory.lrfu.LRFU's crf and
# last) and its provenance (dmt.memory.provenance.Provenance's fields).
SLOT_ARRAYS = (
    "live",
    "lrfu_crf",
    "lrfu_last",
    "inserted_at",
    "read_count",
    "origin_unit",
    "origin_tokens",
    "next_token",
)
# Per-slot arrays that stores saved before they existed lack: their slots restore as an empty slot's
# (next tokens unknown).
LATER_SLOT_ARRAYS = ("next_token",)


@dataclass(frozen=True)
class StoreSettings:
    """What a store is built with (see :class:`~dmt.memory.store.KNNStore` for their meaning), as plain
    ints, floats and strings; :func:`check_settings` builds it from unchecked values."""

    key_dim: int
    value_dim: int
    capacity: int
    metric: Metric
    lrfu_lambda: float
    value_dtype: str
    eviction: str


def check_settings(
    key_dim: int,
    value_dim: int,
    capacity: int,
    metric: str,
    lrfu_lambda: float,
    value_dtype: str,
    eviction: str,
) -> StoreSettings:
    """The settings, checked in this order and converted to plain ints, floats and strings.

    Raises:
        ValueError: naming the first setting that is out of range or unknown.
    """
    for name, value in (("key_dim", key_dim), ("value_dim", value_dim), ("capacity", capacity)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= lrfu_lambda <= 1.0:
        raise ValueError(f"lrfu_lambda must be in [0, 1], got {lrfu_lambda}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
    return StoreSettings(
        int(key_dim),
        int(value_dim),
        int(capacity),
        check_metric(metric),
        float(lrfu_lambda),
        value_dtype,
        check_eviction(eviction),
    )


def empty_slots(capacity: int) -> dict[str, np.ndarray]:
    """The per-slot arrays of an empty store of ``capacity`` slots, ``(capacity, ...)`` each, by
    :data:`SLOT_ARRAYS` name: nothing live, no LRFU history, no provenance."""
    return {
        "live": np.zeros(capacity, dtype=bool),
        "lrfu_crf": np.zeros(capacity, dtype=np.float64),
        "lrfu_last": np.zeros(capacity, dtype=np.int64),
        **Provenance.empty_arrays(capacity),
    }


class StoreState(NamedTuple):
    """A store's whole state: :meth:`KNNStore.state <dmt.memory.store.KNNStore.state>` gives the store's own
    arrays and objects (not copies: writing to them writes to the store), and :meth:`KNNStore.from_state
    <dmt.memory.store.KNNStore.from_state>` holds the ones it is given as they are (memory maps stay mapped).

    ``keys`` and ``values`` hold ``R`` rows, every live slot below ``R <= capacity``; every array of
    ``slots`` spans the capacity.
    """

    keys: np.ndarray  # (R, key_dim) float32
    values: np.ndarray  # (R, value_dim) in the store's value dtype
    slots: dict[str, np.ndarray]  # every SLOT_ARRAYS name → (capacity, ...), as empty_slots lays them out
    index: KeyIndex  # the key index over the live slots' keys
    now: int  # the LRFU clock
    stats: MemoryStats  # the cumulative counters; ``entries`` stays as built (KNNStore.stats counts them)


def empty_state(settings: StoreSettings, index: KeyIndex) -> StoreState:
    """The state of a new store of ``settings`` around its new ``index``: all ``capacity`` rows of keys and
    values allocated (zero), no entry live, the clock and the counters at 0."""
    keys = np.zeros((settings.capacity, settings.key_dim), dtype=np.float32)  # (C, key_dim)
    values = np.zeros((settings.capacity, settings.value_dim), dtype=settings.value_dtype)  # (C, value_dim)
    return StoreState(keys, values, empty_slots(settings.capacity), index, 0, MemoryStats())
