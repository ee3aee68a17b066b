"""``KNNStore``: a fixed-capacity key→value memory searched by a key index, evicting by LRFU (or FIFO, or
at random) when full.

Slots ``0 .. capacity - 1`` are both the rows of the keys and values (:mod:`dmt.memory.rows`) and the index
labels, so an id returned by :meth:`KNNStore.search` indexes them (:meth:`KNNStore.get`) directly. An id
stays valid until its entry is evicted by :meth:`KNNStore.insert` or merged away by
:meth:`KNNStore.recombine`; after that the slot may be reused for a different entry, so ids must not be
kept across inserts. Per slot the store keeps a live mask, LRFU state and provenance
(:mod:`dmt.memory.slots`). Saving and loading are :mod:`dmt.memory.persistence`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.memory.backends import make_index
from dmt.memory.base import MemoryStats, as_float_matrix, check_ids, check_k, check_query_tensor
from dmt.memory.eviction import EVICTIONS as EVICTIONS  # re-exported: the policies a store accepts
from dmt.memory.provenance import ORIGIN_SPAN, origin_array
from dmt.memory.recall import recall_at_k
from dmt.memory.recombine import check_merge_args, merge_groups
from dmt.memory.rows import Rows
from dmt.memory.slots import Slots
from dmt.memory.state import VALUE_DTYPES as VALUE_DTYPES  # re-exported: the value dtypes a store accepts
from dmt.memory.state import StoreSettings, StoreState, check_settings, empty_state


class KNNStore:
    """kNN memory of ``capacity`` (key, value) entries.

    Args:
        key_dim, value_dim: widths of keys and values.
        capacity: maximum number of entries; inserting into a full store evicts victims (``eviction``).
        metric: ``l2 | ip | cosine`` in the conventions of ``dmt.memory.metrics``.
        lrfu_lambda: LRFU λ in [0, 1]; 0 evicts the least frequently, 1 the least recently used.
        value_dtype: storage dtype of values (``float16`` halves memory; :meth:`get` still returns float32).
        index: key index settings: ``backend`` (``hnsw`` default, ``exact`` or ``auto``, see
            :mod:`dmt.memory.backends`) and the hnsw ones (``M``, ``ef_construction``, ``ef_search``,
            ``num_threads``); ``ef_search`` None (the default) derives it per search from k and the size.
        eviction: ``lrfu`` (lowest LRFU score), ``fifo`` (earliest inserted) or ``random`` (uniform,
            deterministic in the store's state), see :mod:`dmt.memory.eviction`. Stores with fixed keys
            (product keys) never evict and ignore it.

    The clock advances by one per query referenced (:meth:`reference`); inserts happen at the current
    time, and eviction victims are scored at it.
    """

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        capacity: int,
        metric: str = "ip",
        lrfu_lambda: float = 0.5,
        value_dtype: str = "float32",
        index: dict[str, int | str | None] | None = None,
        eviction: str = "lrfu",
    ) -> None:
        settings = check_settings(key_dim, value_dim, capacity, metric, lrfu_lambda, value_dtype, eviction)
        self._hold(settings, empty_state(settings, make_index(key_dim, metric, capacity, **(index or {}))))
        if self._index.keys_are_fixed:  # product keys: every slot holds its key from the start
            self._rows.keys[:] = self._index.keys(np.arange(capacity))
            self._slots.live[:] = True

    @classmethod
    def from_state(cls, settings: StoreSettings, state: StoreState) -> KNNStore:
        """A store of ``settings`` holding ``state`` as it is (no copy), with no device copies. Nothing is
        checked: :mod:`dmt.memory.persistence` checks the arrays against ``settings`` and builds the index."""
        store = cls.__new__(cls)
        store._hold(settings, state)
        return store

    def _hold(self, settings: StoreSettings, state: StoreState) -> None:
        """Take on ``settings`` and ``state`` (for ``__init__`` and :meth:`from_state`)."""
        self.key_dim, self.value_dim, self.capacity = settings.key_dim, settings.value_dim, settings.capacity
        self.metric, self.lrfu_lambda = settings.metric, settings.lrfu_lambda
        self.value_dtype, self.eviction = settings.value_dtype, settings.eviction
        self._index, self._stats = state.index, state.stats
        self._rows = Rows(state.keys, state.values, self.capacity)
        self._slots = Slots(state.slots, self.lrfu_lambda, state.now)

    def state(self) -> StoreState:
        """The store's whole state, its own arrays and objects (see :class:`~dmt.memory.state.StoreState`)."""
        rows, slots = self._rows, self._slots
        return StoreState(rows.keys, rows.values, slots.arrays(), self._index, slots.now, self._stats)

    def replace_arrays(self, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        """Hold ``keys`` and/or ``values`` instead of arrays they equal in shape, dtype and content (after a
        save: memory maps of the files just written, so later writes land there); device copies stay."""
        self._rows.keys = self._rows.keys if keys is None else keys
        self._rows.values = self._rows.values if values is None else values

    def __len__(self) -> int:
        """Number of live entries."""
        return int(np.count_nonzero(self._slots.live))

    @property
    def stats(self) -> MemoryStats:
        """A snapshot of the cumulative counters with the current entry count."""
        return replace(self._stats, entries=len(self))

    @property
    def now(self) -> int:
        """The LRFU clock: number of queries referenced so far (rows passed to :meth:`reference`)."""
        return self._slots.now

    @property
    def keys_are_fixed(self) -> bool:
        """True when the index fixes every slot's key (product keys): no inserts, only value updates."""
        return self._index.keys_are_fixed

    @property
    def index_backend(self) -> str:
        """The concrete key index in use: ``hnsw``, ``exact``, ``product`` or ``faiss``."""
        return self._index.backend

    @property
    def index_params(self) -> dict[str, Any]:
        """The key index's settings, as :func:`~dmt.memory.backends.make_index` takes them."""
        return self._index.params

    @property
    def index_state(self) -> dict[str, Any]:
        """What the key index derived at run time (:attr:`~dmt.memory.index.KeyIndex.search_state`: for
        faiss whether it is trained, its ``nlist``, calibrated ``nprobe`` and recall, its trainings)."""
        return self._index.search_state

    def set_search_breadth(self, ef_search: int | None) -> None:
        """An hnsw store's ``ef_search`` from now on (None: derived per search from k and the size);
        ``ValueError`` for the other backends, which have no search breadth."""
        self._index.set_ef(ef_search)

    @property
    def device(self) -> torch.device:
        """Where searches run and :meth:`get_tensors` answers: the index's device (the host for hnsw)."""
        return self._index.device

    def to(self, device: torch.device | str) -> KNNStore:
        """Put the searchable state (exact and product indexes) and a copy of the keys and values,
        which every write updates too, on ``device`` (:mod:`dmt.memory.rows`); hnsw stays on the host."""
        self._index.to(device)
        self._rows.to(self.device)
        return self

    def search(
        self, queries: np.ndarray, k: int, by_magnitude: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``(N, k)`` int64 (-1 padding) and distances ``(N, k)`` float32 (+inf padding) of the ``k``
        nearest entries of each of ``queries (N, key_dim)``, nearest first; no keys or values are copied.
        ``by_magnitude`` (``ip`` and ``cosine`` stores): the ``k`` of largest ``|similarity|`` instead,
        largest first, with their ordinary distances (:meth:`dmt.memory.index.KeyIndex.search_torch`).
        An empty store (cold start) answers with all ids -1, and ``N = 0`` with empty ``(0, k)`` results.
        Neither the clock nor the LRFU state changes: a caller reports what it used with
        :meth:`reference`. Only ``stats.queries`` counts the queries.
        """
        check_k(k, self.capacity, self.metric, by_magnitude)
        queries = as_float_matrix("queries", queries, self.key_dim)
        self._stats.queries += len(queries)
        ids, distances = self._index.search_torch(torch.from_numpy(queries), int(k), by_magnitude)
        return ids.numpy(), distances.numpy()

    def search_torch(
        self, queries: torch.Tensor, k: int, by_magnitude: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for floating ``queries (N, key_dim)`` on any device (cast to float32, detached),
        answered as int64 ids and float32 distances on that device; on the store's :attr:`device` nothing
        leaves it. Only a host index (hnsw) checks the queries for NaN/inf: a torch index would wait for
        the device, and gives a non-finite query non-finite distances (see :mod:`dmt.memory.index`)."""
        check_k(k, self.capacity, self.metric, by_magnitude)
        check_query_tensor(queries, self.key_dim)
        self._stats.queries += len(queries)
        return self._index.search_torch(queries.detach().float(), int(k), by_magnitude)

    def recall(self, queries: np.ndarray, k: int, by_magnitude: bool = False) -> float:
        """Recall@k of :meth:`search` against exact search over the live entries for ``queries (N,
        key_dim)`` (:func:`dmt.memory.recall.recall_at_k`: NaN for an empty store or ``N = 0``, ties count
        as found). The store is not changed: no clock, LRFU or counter moves."""
        return recall_at_k(self._index, queries, k, self._rows.keys, self.live_ids(), by_magnitude)

    def live_ids(self) -> np.ndarray:
        """``(L,)`` int64: the ids of the live entries, ascending."""
        return np.flatnonzero(self._slots.live).astype(np.int64)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(M, key_dim)`` float32 and values ``(M, value_dim)`` float32 of live ``ids (M,)``."""
        return self._rows.read(self._slots.check_live(ids, "get"))

    def get_tensors(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`get` as new float32 tensors on :attr:`device`: on a device, gathered from the copies
        there (only ``ids`` cross from the host)."""
        if not self._rows.mirror.active:
            keys, values = self.get(ids)
            return torch.from_numpy(keys), torch.from_numpy(values)
        return self._rows.mirror.gather(self._slots.check_live(ids, "get_tensors"))

    # Whether :meth:`tables` gives every row at once (a pack searched on disk does not).
    has_tables = True

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's key ``(R, key_dim)`` float32 and entry ``(R, value_dim)`` in the value dtype, row =
        id, as tensors on :attr:`device` sharing the store's memory (``R`` covers every live id; free rows
        hold stale data). For reading in place; writing through them bypasses the store's bookkeeping."""
        return self._rows.tables()

    def reference(self, ids: np.ndarray) -> None:
        """Count the LRFU references of one search: ``ids (N, k)`` as :meth:`search` returned them, or
        ``(M,)`` for a single query of ``M`` references. Row ``n`` is referenced at tick ``now + n + 1``
        and the clock ends at ``now + N``, also for rows without a valid id, so replicas that apply the
        same writes keep the same clock. Duplicates each count; -1 and ids of entries that are no longer
        live are ignored (``stats.reads`` and each entry's :meth:`read_counts` count the rest).
        :meth:`search` counts none, so a caller references what it used, when it applies its writes (e.g.
        once per training step on every data-parallel replica)."""
        rows = np.asarray(ids)
        if rows.ndim not in (1, 2):
            raise ValueError(f"ids must have shape (N, k) or (M,), got {rows.shape}")
        rows = rows[None] if rows.ndim == 1 else rows  # (N, k); a 1-D ids is one query
        self._stats.reads += self._slots.reference(check_ids(rows, self.capacity).reshape(rows.shape))

    def lrfu_scores(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` float64: the LRFU CRF of the live ``ids (M,)`` now (``lrfu`` evicts the lowest first)."""
        return self._slots.lrfu.crf_at(self._slots.check_live(ids, "lrfu_scores"), self._slots.now)

    def insertion_times(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` int64: the clock when each of the live ``ids (M,)`` was stored (see :meth:`recombine`)."""
        return self._slots.provenance.inserted_at[self._slots.check_live(ids, "insertion_times")]

    def read_counts(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` int64: references to the live ``ids (M,)`` since they were stored (:meth:`recombine`)."""
        return self._slots.provenance.read_count[self._slots.check_live(ids, "read_counts")]

    def origins(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the live ``ids (M,)`` came from, as :meth:`insert` recorded it (see :meth:`recombine`): MLP
        units ``(M,)`` int32 and token spans ``(M, ORIGIN_SPAN)`` int32, -1 where unknown."""
        return self._slots.provenance.origins(self._slots.check_live(ids, "origins"))

    def next_tokens(self, ids: np.ndarray) -> np.ndarray:
        """``(...)`` int64 of ``ids (...)`` (any shape, -1 padding): the token that followed each entry's
        origin as :meth:`insert` recorded it; -1 for padding, entries no longer live and unknown tokens."""
        ids = np.asarray(ids)
        flat = check_ids(ids.reshape(-1), self.capacity)
        live = self._slots.is_live(flat)
        tokens = np.full(len(flat), -1, dtype=np.int64)
        tokens[live] = self._slots.provenance.next_token[flat[live]]
        return tokens.reshape(ids.shape)

    def insert(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        origin_units: np.ndarray | None = None,
        origin_tokens: np.ndarray | None = None,
        next_tokens: np.ndarray | None = None,
    ) -> np.ndarray:
        """Store ``keys (N, key_dim)`` / ``values (N, value_dim)``; returns their slot ids ``(N,)`` int64.

        Free slots are used first (lowest first); the rest evict live entries chosen by the store's
        ``eviction`` policy (never an entry of this call, since victims are chosen before any of it is
        stored). Every stored entry is inserted at the current clock (:meth:`insertion_times`) with a
        read count of 0. If ``N > capacity`` only the last ``capacity`` rows are stored and the earlier
        rows get id -1.

        ``origin_units (N,)``: the MLP unit each entry is seeded from; ``origin_tokens (N, ORIGIN_SPAN)``: the
        ids of the text span ending at the token that inserts it, left-padded with -1; ``next_tokens (N,)``:
        the token that followed that span (what a ``next_token_weight`` read predicts); None: all -1.
        """
        self._index.refuse_if_keys_fixed("insert")
        keys = as_float_matrix("keys", keys, self.key_dim)
        values = as_float_matrix("values", values, self.value_dim, dtype=self.value_dtype)
        if len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys but {len(values)} values")
        units = origin_array("origin_units", origin_units, (len(keys),))
        tokens = origin_array("origin_tokens", origin_tokens, (len(keys), ORIGIN_SPAN))
        following = origin_array("next_tokens", next_tokens, (len(keys),))
        ids = np.full(len(keys), -1, dtype=np.int64)
        stored = min(len(keys), self.capacity)
        if stored == 0:
            return ids
        keys, values, units = keys[-stored:], values[-stored:], units[-stored:]
        tokens, following = tokens[-stored:], following[-stored:]
        free, victims = self._slots.choose(stored, self.eviction, self._stats.inserts)
        self._remove(victims)
        self._stats.evictions += len(victims)
        slots = np.concatenate([free, victims])
        self._rows.write(slots, keys, values)
        self._slots.stored(slots, units, tokens, following)
        self._index.add(slots, keys)
        self._rows.sync(slots)
        self._stats.inserts += stored
        ids[-stored:] = slots
        return ids

    def _remove(self, slots: np.ndarray) -> None:
        """Drop live ``slots (M,)`` from the index and the live mask (their slots become free)."""
        self._index.remove(slots)
        self._slots.live[slots] = False

    def update_values(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        """``values[ids] += deltas`` for ``ids (M,)``, ``deltas (M, value_dim)`` (sparse SGD step).
        Duplicate ids accumulate; ids -1 and ids of entries that are no longer live are skipped. Sums are
        formed in float32 before the single cast to ``value_dtype``."""
        ids = check_ids(ids, self.capacity)
        deltas = as_float_matrix("deltas", deltas, self.value_dim)
        if len(ids) != len(deltas):
            raise ValueError(f"got {len(ids)} ids but {len(deltas)} deltas")
        keep = self._slots.is_live(ids)
        if not keep.all():
            ids, deltas = ids[keep], deltas[keep]
        self._rows.add_to_values(ids, deltas)

    def cast_values(self, value_dtype: str) -> None:
        """Store every value in ``value_dtype`` from now on (one of :data:`VALUE_DTYPES`); a memory-mapped
        store's values move into memory."""
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        self._rows.cast_values(value_dtype)
        self.value_dtype = value_dtype

    def recombine(self, ids: np.ndarray, distances: np.ndarray, max_distance: float) -> int:
        """Merge near entries returned together for one query (``ids (N, k)``, ``distances (N, k)`` of a
        :meth:`search`); returns entries removed. Per row, the live entries within ``max_distance`` (at
        least 2) fold into the nearest (:mod:`dmt.memory.recombine`): key and value become their weighted
        mean, LRFU histories and read counts add up, the nearest keeps its insertion time and origin, and
        the others are removed. Entries merged away earlier in the call are skipped."""
        self._index.refuse_if_keys_fixed("recombine")
        all_distances = check_merge_args(ids, distances, max_distance)
        all_ids = check_ids(ids, self.capacity).reshape(all_distances.shape)
        targets = []  # slots whose key and value changed
        removed = 0
        for members, weights in merge_groups(all_ids, all_distances, max_distance, self._slots.is_live):
            target, others = members[0], members[1:]
            self._rows.fold(members, weights)
            self._slots.merged(target, others)
            self._remove(others)
            self._index.add(np.array([target]), self._rows.keys[target : target + 1])
            targets.append(target)
            removed += len(others)
        self._rows.sync(np.array(targets, dtype=np.int64))
        self._stats.merges += removed
        return removed

    def save(self, directory: str | Path) -> None:
        """Atomically write the store to ``directory``, checksummed (:func:`dmt.memory.persistence.save`)."""
        from dmt.memory import persistence  # imported here, as persistence builds on this module

        persistence.save(self, directory)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False, verify: bool = True) -> KNNStore:
        """Read and check a :meth:`save` directory (:func:`dmt.memory.persistence.load`): ``mmap`` maps the
        keys and values from their files, ``verify`` also hashes every file."""
        from dmt.memory import persistence

        return persistence.load(cls, directory, mmap=mmap, verify=verify)

    def state_dict(self) -> dict[str, Any]:
        """The store as a plain dict of numpy arrays and scalars, for checkpoints
        (:func:`dmt.memory.persistence.state_dict`)."""
        from dmt.memory import persistence

        return persistence.state_dict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KNNStore:
        """Inverse of :meth:`state_dict` (:func:`dmt.memory.persistence.from_state_dict`)."""
        from dmt.memory import persistence

        return persistence.from_state_dict(cls, state)
