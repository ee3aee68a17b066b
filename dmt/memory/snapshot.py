"""A ``KNNStore`` taken apart for saving and put back together: one capture, one restore, shared by both
containers of :mod:`dmt.memory.persistence`.

:func:`capture` takes a store apart into its *fields* (settings, entry count, clock, counters: JSON-able
scalars and dicts), its arrays and its key index; :func:`restore` puts one back together and checks every
field and array against the others, so a container only has to deliver the pieces. Both go through the
store's public state (:meth:`KNNStore.state <dmt.memory.store.KNNStore.state>` and :meth:`KNNStore.from_state
<dmt.memory.store.KNNStore.from_state>`).

Arrays are kept up to the store's high-water mark ``H`` (highest live slot + 1, 0 when empty): rows
``0 .. H-1`` of every per-slot array, so a large store holding few entries is saved at its live size
(``capacity`` is a field). The arrays, by name (:data:`ARRAY_NAMES`), with ``S = ORIGIN_SPAN``:

- ``keys (H, key_dim)`` float32 and ``values (H, value_dim)`` in ``value_dtype``;
- ``live (H,)`` bool: which rows hold an entry (rows of merged-away entries are holes);
- ``lrfu_crf (H,)`` float64 and ``lrfu_last (H,)`` int64: the LRFU state (:class:`dmt.memory.lrfu.LRFU`);
- ``inserted_at (H,)`` int64 and ``read_count (H,)`` int64: the clock at insertion, references since;
- ``origin_unit (H,)`` int32 and ``origin_tokens (H, S)`` int32: each entry's origin, -1 where unknown;
- ``next_token (H,)`` int32: the token after its origin, -1 where unknown (absent from stores saved before
  it was recorded, :data:`~dmt.memory.state.LATER_SLOT_ARRAYS`: restored as unknown).

Restoring keeps keys and values as loaded (``H`` rows; the store grows them on its first insert beyond) and
pads the other arrays to ``capacity`` with the state of an empty slot. The key index is saved only when it
holds something beyond the keys (``KeyIndex.has_file``: the hnsw graph, the product sub-key tables); the
exact index is rebuilt from the keys and the live mask. An hnsw graph of an ``ip`` or ``l2`` store holds
the keys exactly (:func:`index_holds_keys`), so its keys are saved there only and read back from it
(``cosine`` graphs hold them normalised, so those stores also save ``keys``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dmt.kernel.store_files import keys_from_hnsw
from dmt.memory.backends import BACKENDS, INDEX_PARAMS, index_class, load_index, make_index
from dmt.memory.base import MemoryStats
from dmt.memory.index import KeyIndex
from dmt.memory.integrity import MemoryStoreError, store_errors
from dmt.memory.state import (
    LATER_SLOT_ARRAYS,
    SLOT_ARRAYS,
    StoreSettings,
    StoreState,
    check_settings,
    empty_slots,
)
from dmt.memory.store import KNNStore

# Every array a container holds, by name: the keys, the values and the per-slot arrays.
ARRAY_NAMES = ("keys", "values", *SLOT_ARRAYS)
# The fields that are the store's settings, in StoreSettings' order.
SETTINGS = tuple(field.name for field in dataclasses.fields(StoreSettings))

# Field → accepted types (bools are rejected separately although they are Integral).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key_dim": numbers.Integral,
    "value_dim": numbers.Integral,
    "capacity": numbers.Integral,
    "metric": str,
    "lrfu_lambda": numbers.Real,
    "value_dtype": str,
    "eviction": str,
    "index_params": Mapping,
    "entries": numbers.Integral,
    "now": numbers.Integral,
    "stats": Mapping,
}
# Integer-valued sub-dicts of the fields → (the names they may hold, those that may also be None).
# ``index_params`` may also name its ``backend``, checked separately as a string; its ``ef_search`` is None
# when derived per search from k and the size.
_COUNTER_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stats": (tuple(field.name for field in dataclasses.fields(MemoryStats)), ()),
    "index_params": (INDEX_PARAMS, ("ef_search", "nlist", "nprobe", "leaves", "leaves_to_search")),
}


class Captured(NamedTuple):
    """A store taken apart: what both containers hold, each in its own form."""

    fields: dict[str, Any]  # the _FIELDS: settings, entry count, LRFU clock, counters
    arrays: dict[
        str, np.ndarray
    ]  # every saved ARRAY_NAMES name → rows 0 .. H-1 of the store's array (a view)
    index: KeyIndex  # written as the index file, or as that file's bytes, if it has one


def high_water_mark(live: np.ndarray) -> int:
    """``H``: the highest live slot of the ``live (C,)`` mask + 1, or 0 when none is live."""
    live_slots = np.flatnonzero(live)
    return int(live_slots[-1]) + 1 if len(live_slots) else 0


def capture(store: KNNStore) -> Captured:
    """``store`` as fields, arrays (up to its high-water mark) and key index, for a container to write."""
    state = store.state()
    fields = {
        "key_dim": store.key_dim,
        "value_dim": store.value_dim,
        "capacity": store.capacity,
        "metric": store.metric,
        "lrfu_lambda": store.lrfu_lambda,
        "value_dtype": store.value_dtype,
        "eviction": store.eviction,
        "index_params": store.index_params,
        "entries": len(store),
        "now": store.now,
        "stats": dataclasses.asdict(state.stats),
    }
    rows = high_water_mark(state.slots["live"])
    arrays = {"keys": state.keys, "values": state.values, **state.slots}
    return Captured(fields, {name: arrays[name][:rows] for name in saved_arrays(fields)}, state.index)


def index_has_file(fields: Mapping[str, Any]) -> bool:
    """Whether the index that checked ``fields`` name is saved (an index file, or ``index_bytes``)."""
    return index_class(fields["index_params"].get("backend", "hnsw")).has_file


def index_holds_keys(fields: Mapping[str, Any]) -> bool:
    """Whether the saved index of checked ``fields`` holds the keys as they are (an hnsw graph of an ip or
    l2 store), so that ``keys`` is not saved beside it."""
    return fields["index_params"].get("backend", "hnsw") == "hnsw" and fields["metric"] != "cosine"


def saved_arrays(fields: Mapping[str, Any]) -> list[str]:
    """The :data:`ARRAY_NAMES` a container of a store with checked ``fields`` holds."""
    return [name for name in ARRAY_NAMES if not (name == "keys" and index_holds_keys(fields))]


def restore(
    store_class: type[KNNStore],
    fields: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    index: Path | np.ndarray | None,
    source: str,
    where: Callable[[str], str],
) -> KNNStore:
    """Rebuild a store from what :func:`capture` took apart, checking every array against the fields.

    Args:
        fields: the :class:`Captured` fields, already checked by :func:`check_fields` (other keys, such as
            ``format_version``, are ignored).
        arrays: every saved :data:`ARRAY_NAMES` name → its array of ``H <= capacity`` rows; keys and values
            are used as they are (memory maps stay mapped), the others copied into arrays of ``capacity``
            rows. One of :data:`~dmt.memory.state.LATER_SLOT_ARRAYS` may be missing (an older save).
        index: the index file, or its bytes as a 1-D ``uint8`` array; None for an index without a file
            (:func:`index_has_file`), which is rebuilt from the keys.
        source: names the origin of ``fields`` in errors.
        where: names the origin (file or checkpoint key) of an array or of ``"index_bytes"`` in errors.
    Raises:
        MemoryStoreError: naming the field, the array or the index that is wrong.
    """
    try:
        settings = check_settings(*(fields[name] for name in SETTINGS))
    except ValueError as error:
        raise MemoryStoreError(f"{source}: {error}") from error
    if index_holds_keys(fields) and index is not None:
        with store_errors():
            keys = keys_from_hnsw(index, arrays["live"], settings.key_dim, where("index_bytes"))
        arrays = {**arrays, "keys": keys}
    slots = empty_slots(settings.capacity)  # an empty store's bookkeeping, its first H rows restored below
    rows = _check_arrays(settings, fields, arrays, slots, source, where)
    for name, array in slots.items():
        if name in arrays:
            array[:rows] = arrays[name]
    key_index = _restore_index(settings, fields["index_params"], index, arrays["keys"], slots["live"], where)
    stats = MemoryStats(**{name: int(count) for name, count in fields["stats"].items()})
    state = StoreState(arrays["keys"], arrays["values"], slots, key_index, int(fields["now"]), stats)
    return store_class.from_state(settings, state)


def _check_arrays(
    settings: StoreSettings,
    fields: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    slots: Mapping[str, np.ndarray],
    source: str,
    where: Callable[[str], str],
) -> int:
    """Check every array's shape and dtype against ``settings`` and the empty store's ``slots`` and the live
    count against ``fields``; returns their row count ``H``."""
    live = arrays["live"]
    if live.ndim != 1 or live.dtype != np.bool_ or len(live) > settings.capacity:
        raise MemoryStoreError(
            f"{where('live')}: expected shape (H,) with H <= capacity {settings.capacity} dtype bool "
            f"(from {source}), got shape {live.shape} dtype {live.dtype.name}"
        )
    if int(np.count_nonzero(live)) != fields["entries"]:
        raise MemoryStoreError(
            f"{where('live')}: {np.count_nonzero(live)} live entries, {source} says {fields['entries']}"
        )
    rows = len(live)
    expected = {
        "keys": ((rows, settings.key_dim), np.dtype(np.float32)),
        "values": ((rows, settings.value_dim), np.dtype(settings.value_dtype)),
        **{name: ((rows, *array.shape[1:]), array.dtype) for name, array in slots.items()},
    }
    for name, (shape, dtype) in expected.items():
        if name in LATER_SLOT_ARRAYS and name not in arrays:
            continue
        array = arrays[name]
        if array.shape != shape or array.dtype != dtype:
            raise MemoryStoreError(
                f"{where(name)}: expected shape {shape} dtype {dtype.name} (from {source} and "
                f"{where('live')}), got shape {array.shape} dtype {array.dtype.name}"
            )
    return rows


def _restore_index(
    settings: StoreSettings,
    params: Mapping[str, Any],
    index: Path | np.ndarray | None,
    keys: np.ndarray,
    live: np.ndarray,
    where: Callable[[str], str],
) -> KeyIndex:
    """The key index over ``keys (H, key_dim)`` and the restored ``live (C,)`` mask: read from ``index`` (a
    file or its bytes), or rebuilt from the live keys when the index has no file (``index`` None)."""
    if index is None:
        rebuilt = make_index(settings.key_dim, settings.metric, settings.capacity, **params)
        live_slots = np.flatnonzero(live)
        # Without holes the keys go in as a view of the (possibly memory-mapped) array, not a copy.
        holes = len(live_slots) != high_water_mark(live)
        rebuilt.add(live_slots, keys[live_slots] if holes else keys[: len(live_slots)])
        return rebuilt
    if isinstance(index, np.ndarray) and (index.ndim != 1 or index.dtype != np.uint8):
        raise MemoryStoreError(
            f"{where('index_bytes')}: expected a 1-D uint8 array, "
            f"got shape {index.shape} dtype {index.dtype.name}"
        )
    try:
        return load_index(index, settings.key_dim, settings.metric, settings.capacity, live=live, **params)
    except (RuntimeError, ValueError) as error:  # hnswlib reports a corrupt graph as RuntimeError
        raise MemoryStoreError(f"{where('index_bytes')}: not a usable key index ({error})") from error


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_fields(fields: Mapping[str, Any], source: str) -> None:
    """Presence and types of the fields; their values are checked by
    :func:`~dmt.memory.state.check_settings` and against the arrays."""
    for name, kind in _FIELDS.items():
        if name not in fields:
            raise MemoryStoreError(f"{source}: missing field {name!r}")
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MemoryStoreError(f"{source}: field {name!r} has the wrong type ({value!r})")
    backend = fields["index_params"].get("backend", "hnsw")
    if backend == "auto" or backend not in BACKENDS:
        raise MemoryStoreError(f"{source}: field 'index_params' names an unknown backend {backend!r}")
    for name, (allowed, nullable) in _COUNTER_FIELDS.items():
        counters = {k: v for k, v in fields[name].items() if k != "backend"}
        valid = all(_is_int(v) or (v is None and k in nullable) for k, v in counters.items())
        if not set(counters) <= set(allowed) or not valid:
            also = f" ({', '.join(nullable)} also to null)" if nullable else ""
            raise MemoryStoreError(
                f"{source}: field {name!r} must map some of {', '.join(allowed)} to integers{also}, "
                f"got {dict(counters)!r}"
            )
    if fields["now"] < 0:
        raise MemoryStoreError(f"{source}: field 'now' must be >= 0, got {fields['now']}")
