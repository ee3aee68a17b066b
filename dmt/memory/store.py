"""``KNNStore``: a fixed-capacity key→value memory searched by a key index, evicting by LRFU (or FIFO, or
at random) when full.

Slots ``0 .. capacity - 1`` are both the rows of the store's own arrays and the index labels, so an
id returned by :meth:`KNNStore.search` indexes ``keys``/``values`` (:meth:`KNNStore.get`) directly. An id
stays valid until its entry is evicted by :meth:`KNNStore.insert` or merged away by
:meth:`KNNStore.recombine`; after that the slot may be reused for a different entry, so ids must not be
kept across inserts.

Layout: every live slot lies below the *high-water mark* ``H`` (highest live slot + 1). Keys ``(R, key_dim)``
and values ``(R, value_dim)`` hold ``R`` rows with ``H <= R <= capacity``: a new store allocates all
``capacity`` rows, a restored one only the ``H`` rows it saved (kept memory-mapped on request), and the
first insert into a slot ``>= R`` grows both to ``capacity``. The per-slot bookkeeping always spans the
capacity: the live mask, LRFU state, insertion time, reads since insertion (:meth:`KNNStore.read_counts`)
and origin (:meth:`KNNStore.origins`: the MLP unit an entry was seeded from, and the ids of the
:data:`ORIGIN_SPAN` tokens ending at the one whose query or key inserted it).

Searching neither copies entries, nor counts references, nor moves the LRFU clock: a caller reads what it
uses with :meth:`KNNStore.get` and reports the ids of each search with :meth:`KNNStore.reference` (a memory
layer does so once per step, alike on every data-parallel replica), which advances the clock by one per
query. Saving and loading live in :mod:`dmt.memory.persistence`.

Devices: the store's arrays and bookkeeping are numpy on the host, and they are what is saved.
:meth:`KNNStore.to` puts the searchable state of an exact or product index on a torch device together with
a copy of the keys and values there (every write updates both), so that :meth:`KNNStore.search_torch` and
:meth:`KNNStore.get_tensors` answer on the device without host copies; an hnsw store stays on the host.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.memory import persistence
from dmt.memory.backends import make_index
from dmt.memory.base import MemoryStats, as_float_matrix
from dmt.memory.cells import CellIndex
from dmt.memory.eviction import EVICTIONS as EVICTIONS  # re-exported: the policies a store accepts
from dmt.memory.eviction import check_eviction, choose_victims
from dmt.memory.hnsw import HnswIndex
from dmt.memory.lrfu import LRFU
from dmt.memory.metrics import Metric, check_metric, pairwise_distance_np

VALUE_DTYPES = ("float32", "float16")
# Exact search in recall(): queries × keys per distance block, so memory stays bounded for any store.
RECALL_QUERY_BLOCK = 1024
RECALL_KEY_BLOCK = 4096
# recall(): an approximate neighbour this close to the k-th exact distance is a tie, not a miss.
RECALL_TIE_TOLERANCE = 1e-5
# Token ids recorded per entry as its origin: the text span ending at the token that inserted it.
ORIGIN_SPAN = 8


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
        self._configure(key_dim, value_dim, capacity, metric, lrfu_lambda, value_dtype, eviction)
        self._keys = np.zeros((capacity, key_dim), dtype=np.float32)  # (R, key_dim), R = C here
        self._values = np.zeros((capacity, value_dim), dtype=value_dtype)  # (R, value_dim)
        self._index = make_index(key_dim, metric, capacity, **(index or {}))
        if self._index.keys_are_fixed:  # product keys: every slot holds its key from the start
            self._keys[:] = self._index.keys(np.arange(capacity))
            self._live[:] = True

    def _configure(
        self,
        key_dim: int,
        value_dim: int,
        capacity: int,
        metric: str,
        lrfu_lambda: float,
        value_dtype: str,
        eviction: str,
    ) -> None:
        """Validate and set everything except keys, values and the index (shared with restoring); the
        per-slot bookkeeping starts as that of an empty store."""
        for name, value in (("key_dim", key_dim), ("value_dim", value_dim), ("capacity", capacity)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= lrfu_lambda <= 1.0:
            raise ValueError(f"lrfu_lambda must be in [0, 1], got {lrfu_lambda}")
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        self.key_dim, self.value_dim, self.capacity = int(key_dim), int(value_dim), int(capacity)
        self.metric: Metric = check_metric(metric)
        self.lrfu_lambda = float(lrfu_lambda)
        self.value_dtype = value_dtype
        self.eviction = check_eviction(eviction)
        self._lrfu = LRFU(self.capacity, self.lrfu_lambda)
        self._live = np.zeros(self.capacity, dtype=bool)  # (C,)
        self._inserted_at = np.zeros(self.capacity, dtype=np.int64)  # (C,) clock when each entry was stored
        self._read_count = np.zeros(self.capacity, dtype=np.int64)  # (C,) references since then
        self._origin_unit = np.full(self.capacity, -1, dtype=np.int32)  # (C,) seeding MLP unit, or -1
        self._origin_tokens = np.full((self.capacity, ORIGIN_SPAN), -1, dtype=np.int32)  # (C, S) or -1
        self._now = 0
        self._stats = MemoryStats()
        # Copies of keys (R, key_dim) and values (R, value_dim) on the index's device; None on the host,
        # where the numpy arrays are read directly.
        self._device_keys: torch.Tensor | None = None
        self._device_values: torch.Tensor | None = None

    def __len__(self) -> int:
        """Number of live entries."""
        return int(np.count_nonzero(self._live))

    @property
    def stats(self) -> MemoryStats:
        """A snapshot of the cumulative counters with the current entry count."""
        return replace(self._stats, entries=len(self))

    @property
    def now(self) -> int:
        """The LRFU clock: number of queries referenced so far (rows passed to :meth:`reference`)."""
        return self._now

    # ------------------------------------------------------------------ queries and updates

    @property
    def keys_are_fixed(self) -> bool:
        """True when the index fixes every slot's key (product keys): no inserts, only value updates."""
        return self._index.keys_are_fixed

    @property
    def index_backend(self) -> str:
        """The concrete key index in use: ``hnsw``, ``exact``, ``product`` or ``cells``."""
        return self._index.backend

    @property
    def index_params(self) -> dict[str, Any]:
        """The key index's settings, as :func:`~dmt.memory.backends.make_index` takes them."""
        return self._index.params

    @property
    def pending_entries(self) -> int:
        """Entries a cells index has not filed into its cells yet (searched exactly); 0 for the others."""
        return len(self._index.pending) if isinstance(self._index, CellIndex) else 0

    def set_search_breadth(self, ef_search: int | None) -> None:
        """An hnsw store's ``ef_search`` from now on (None: derived per search from k and the size);
        ``ValueError`` for the other backends, which have no search breadth."""
        if not isinstance(self._index, HnswIndex):
            raise ValueError(f"ef_search is an hnsw setting; this store's index is {self.index_backend}")
        self._index.set_ef(ef_search)

    @property
    def device(self) -> torch.device:
        """Where searches run and :meth:`get_tensors` answers: the index's device (the host for hnsw)."""
        return self._index.device

    def to(self, device: torch.device | str) -> KNNStore:
        """Put the searchable state (the exact index's table, the product index's sub-keys) and a copy of
        the keys and values on ``device``; an hnsw store stays on the host. Returns self.

        The numpy arrays on the host stay the store's record (saved, read by :meth:`get`, counted by the
        bookkeeping); on a device other than the host each write also updates the copies there.
        """
        self._index.to(device)
        if self.device.type == "cpu":
            self._device_keys = self._device_values = None
        elif self._device_keys is None or self._device_keys.device != self.device:
            self._copy_to_device()
        return self

    def _copy_to_device(self) -> None:
        """Copy all keys and values to the index's device (a move, or a change of their row count or
        dtype)."""
        self._device_keys = torch.from_numpy(np.asarray(self._keys)).to(self.device)
        self._device_values = torch.from_numpy(np.asarray(self._values)).to(self.device)

    def _copy_rows_to_device(self, slots: np.ndarray) -> None:
        """After a write on the host: copy its keys and values of ``slots (M,)`` to the device copies."""
        if self._device_keys is None or self._device_values is None:
            return
        rows = torch.from_numpy(slots).to(self.device)
        self._device_keys[rows] = torch.from_numpy(self._keys[slots]).to(self.device)
        self._device_values[rows] = torch.from_numpy(self._values[slots]).to(self.device)

    def _check_k(self, k: int, by_magnitude: bool) -> None:
        """``ValueError`` unless ``k`` is an integer in ``[1, capacity]`` and ``by_magnitude`` fits the
        metric."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > self.capacity:
            raise ValueError(f"k must be an integer in [1, capacity={self.capacity}], got k={k!r}")
        if by_magnitude and self.metric == "l2":
            raise ValueError("by_magnitude ranks by |similarity|: needs an ip or cosine store, not l2")

    def _check_search(self, queries: np.ndarray, k: int, by_magnitude: bool) -> np.ndarray:
        """``queries`` validated as ``(N, key_dim)`` float32, after checking ``k`` and ``by_magnitude``."""
        self._check_k(k, by_magnitude)
        return as_float_matrix("queries", queries, self.key_dim)

    def _search(self, queries: torch.Tensor, k: int, by_magnitude: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The index's answer ``(N, k)``, ``(N, k)`` for checked float32 ``queries (N, key_dim)``, on their
        device, touching no counter."""
        return self._index.search_torch(queries, int(k), by_magnitude)

    def search(
        self, queries: np.ndarray, k: int, by_magnitude: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``(N, k)`` int64 (-1 padding) and distances ``(N, k)`` float32 (+inf padding) of the ``k``
        nearest entries of each of ``queries (N, key_dim)``, nearest first; no keys or values are copied.

        ``by_magnitude`` (``ip`` and ``cosine`` stores): the ``k`` entries of largest ``|similarity|``
        instead, largest first, with their ordinary distances ``1 - similarity`` (exact and product
        indexes rank so in one pass, hnsw merges a search for ``q`` and one for ``-q``, see
        :func:`dmt.memory.index.merge_by_magnitude`).

        An empty store (cold start) answers with all ids -1, and ``N = 0`` with empty ``(0, k)`` results.
        Neither the clock nor the LRFU state changes: a caller reports what it used with
        :meth:`reference`. Only ``stats.queries`` counts the queries.
        """
        queries = self._check_search(queries, k, by_magnitude)
        self._stats.queries += len(queries)
        ids, distances = self._search(torch.from_numpy(queries), k, by_magnitude)
        return ids.numpy(), distances.numpy()

    def search_torch(
        self, queries: torch.Tensor, k: int, by_magnitude: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for floating ``queries (N, key_dim)`` on any device (cast to float32, detached),
        answered as int64 ids and float32 distances on that device.

        On the store's :attr:`device` (exact or product index moved there) nothing leaves the device.
        Otherwise the queries go where the index is once and the results come back once (hnsw: the host,
        which checks the queries for NaN/inf as :meth:`search` does). A torch index does not check them:
        that would wait for the device; a non-finite query gets non-finite distances instead.
        """
        self._check_k(k, by_magnitude)
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise ValueError(f"queries must have shape (N, {self.key_dim}), got {tuple(queries.shape)}")
        if not queries.is_floating_point():
            raise ValueError(f"queries must be a floating-point tensor, got dtype {queries.dtype}")
        self._stats.queries += len(queries)
        return self._search(queries.detach().float(), k, by_magnitude)

    def recall(self, queries: np.ndarray, k: int, by_magnitude: bool = False) -> float:
        """Recall@k of :meth:`search` against exact search over the live entries, for ``queries
        (N, key_dim)``: the fraction of each query's exact top ``min(k, len(self))`` that the index
        returns, averaged over the queries (NaN for an empty store or ``N = 0``).

        Exact search is brute force over the live keys in blocks of :data:`RECALL_KEY_BLOCK` keys and
        :data:`RECALL_QUERY_BLOCK` queries (bounded memory), in the conventions of ``dmt.memory.metrics``;
        ``by_magnitude`` ranks by ``|similarity|`` as :meth:`search` does. A returned entry counts as
        correct when it ranks within :data:`RECALL_TIE_TOLERANCE` of the k-th exact one (ties). The store
        is not changed: no clock, LRFU or counter moves.
        """
        queries = self._check_search(queries, k, by_magnitude)
        live = np.flatnonzero(self._live)  # (L,) ascending
        k_live = min(int(k), len(live))
        if k_live == 0 or len(queries) == 0:
            return float("nan")
        found = self._search(torch.from_numpy(queries), k, by_magnitude)[0].numpy()  # (N, k)
        hits = sum(
            self._exact_hits(
                queries[begin : begin + RECALL_QUERY_BLOCK],
                found[begin : begin + RECALL_QUERY_BLOCK],
                live,
                k_live,
                by_magnitude,
            )
            for begin in range(0, len(queries), RECALL_QUERY_BLOCK)
        )
        return hits / (len(queries) * k_live)

    def _exact_hits(
        self, queries: np.ndarray, found: np.ndarray, live: np.ndarray, k_live: int, by_magnitude: bool
    ) -> int:
        """How many of ``found (n, k)`` (ids, -1 padding) rank within the exact top ``k_live`` of their
        row of ``queries (n, key_dim)`` among the ``live (L,)`` slots, ties included."""
        exact = np.full((len(queries), k_live), np.inf, dtype=np.float32)  # (n, k_live) best ranks so far
        found_rank = np.full(found.shape, np.inf, dtype=np.float32)  # (n, k) rank of each returned id
        position = np.searchsorted(live, found)  # (n, k) index into live; meaningless for -1
        for begin in range(0, len(live), RECALL_KEY_BLOCK):
            block = live[begin : begin + RECALL_KEY_BLOCK]
            rank = pairwise_distance_np(queries, self._keys[block], self.metric)  # (n, b), lower is nearer
            if by_magnitude:
                rank = -np.abs(1.0 - rank)  # largest |similarity| first
            exact = np.partition(np.concatenate([exact, rank], axis=1), k_live - 1, axis=1)[:, :k_live]
            rows, cols = np.nonzero((found >= 0) & (position >= begin) & (position < begin + len(block)))
            found_rank[rows, cols] = rank[rows, position[rows, cols] - begin]
        threshold = exact.max(axis=1, keepdims=True) + RECALL_TIE_TOLERANCE  # (n, 1): the k-th exact rank
        return int(np.count_nonzero(found_rank <= threshold))

    def insert(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        origin_units: np.ndarray | None = None,
        origin_tokens: np.ndarray | None = None,
    ) -> np.ndarray:
        """Store ``keys (N, key_dim)`` / ``values (N, value_dim)``; returns their slot ids ``(N,)`` int64.

        Free slots are used first (lowest first); the rest evict live entries chosen by the store's
        ``eviction`` policy (never an entry of this call, since victims are chosen before any of it is
        stored). Every stored entry is inserted at the current clock (:meth:`insertion_times`) with a
        read count of 0. If ``N > capacity`` only the last ``capacity`` rows are stored and the earlier
        rows get id -1.

        Args:
            origin_units: ``(N,)`` integers, the MLP unit each entry is seeded from; None: -1 for all.
            origin_tokens: ``(N, ORIGIN_SPAN)`` integers, the token ids of the text span ending at the
                token that inserts each entry, left-padded with -1; None: -1 for all.
        """
        self._refuse_if_keys_fixed("insert")
        keys = as_float_matrix("keys", keys, self.key_dim)
        values = as_float_matrix("values", values, self.value_dim, dtype=self.value_dtype)
        if len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys but {len(values)} values")
        units = origin_array("origin_units", origin_units, (len(keys),))
        tokens = origin_array("origin_tokens", origin_tokens, (len(keys), ORIGIN_SPAN))
        ids = np.full(len(keys), -1, dtype=np.int64)
        stored = min(len(keys), self.capacity)
        if stored == 0:
            return ids
        keys, values, units, tokens = keys[-stored:], values[-stored:], units[-stored:], tokens[-stored:]
        # Free slots are derived from the live mask (O(capacity), like the victim scan) so they can
        # never disagree with it.
        free = np.flatnonzero(~self._live)[:stored]
        victims = choose_victims(
            self.eviction,
            self._live,
            stored - len(free),
            self._lrfu,
            self._inserted_at,
            self._now,
            self._stats.inserts,
        )
        self._remove(victims)
        self._stats.evictions += len(victims)
        slots = np.concatenate([free, victims])
        if slots.max() >= len(self._keys):
            self._grow()
        self._keys[slots], self._values[slots] = keys, values
        self._live[slots] = True
        self._inserted_at[slots] = self._now
        self._read_count[slots] = 0
        self._origin_unit[slots], self._origin_tokens[slots] = units, tokens
        self._lrfu.reset(slots, self._now)
        self._index.add(slots, keys)
        self._copy_rows_to_device(slots)
        self._stats.inserts += stored
        ids[-stored:] = slots
        return ids

    def _grow(self) -> None:
        """Give keys and values a row for every slot (a restored store holds only its saved rows).

        One allocation and copy; ``np.zeros`` pages that are never written cost no memory. A memory-mapped
        store is held in memory from then on: later writes no longer reach its files.
        """
        rows = len(self._keys)
        keys = np.zeros((self.capacity, self.key_dim), dtype=np.float32)  # (C, key_dim)
        values = np.zeros((self.capacity, self.value_dim), dtype=self.value_dtype)  # (C, value_dim)
        keys[:rows], values[:rows] = self._keys, self._values
        self._keys, self._values = keys, values
        if self._device_keys is not None:
            self._copy_to_device()

    def _refuse_if_keys_fixed(self, operation: str) -> None:
        if self.keys_are_fixed:
            raise ValueError(
                f"cannot {operation}: this store's keys are fixed by its {self._index.backend} index "
                "(it is full from the start and learns through update_values)"
            )

    def _remove(self, slots: np.ndarray) -> None:
        """Drop live ``slots (M,)`` from the index and the live mask (their slots become free)."""
        self._index.remove(slots)
        self._live[slots] = False

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as flat int64, raising ``ValueError`` unless they are integers in range."""
        ids = np.asarray(ids)
        # Casting floats or bools would silently turn 1.7 into slot 1 and True into slot 1.
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
        ids = ids.astype(np.int64).ravel()
        if ids.size and (ids.min() < -1 or ids.max() >= self.capacity):
            raise ValueError(f"ids must lie in [-1, {self.capacity}), got [{ids.min()}, {ids.max()}]")
        return ids

    def _is_live(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` bool: which of the checked ``ids (M,)`` name live entries (-1 never does)."""
        live = ids >= 0
        live[live] = self._live[ids[live]]
        return live

    def _live_ids(self, ids: np.ndarray, operation: str) -> np.ndarray:
        """``ids`` as flat int64, raising ``ValueError`` unless every one names a live entry."""
        ids = self._check_ids(ids)
        if not self._is_live(ids).all():
            raise ValueError(f"{operation}() needs ids of live entries")
        return ids

    def reference(self, ids: np.ndarray) -> None:
        """Count the LRFU references of one search: ``ids (N, k)`` as :meth:`search` returned them, or
        ``(M,)`` for a single query of ``M`` references.

        Row ``n`` is referenced at tick ``now + n + 1`` and the clock ends at ``now + N``, also for rows
        without a valid id, so replicas that apply the same writes keep the same clock. Duplicates each
        count; -1 and ids of entries that are no longer live are ignored (``stats.reads`` and each entry's
        :meth:`read_counts` count the rest). :meth:`search` counts none, so a caller references what it
        used, when it applies its writes (e.g. once per training step on every data-parallel replica).
        """
        rows = np.asarray(ids)
        if rows.ndim not in (1, 2):
            raise ValueError(f"ids must have shape (N, k) or (M,), got {rows.shape}")
        if rows.ndim == 1:
            rows = rows[None]  # (1, M): one query
        ids = self._check_ids(rows)  # (N·k,)
        ticks = self._now + 1 + np.repeat(np.arange(len(rows)), rows.shape[1])  # (N·k,)
        referenced = self._is_live(ids)
        self._lrfu.reference(ids[referenced], ticks[referenced])
        np.add.at(self._read_count, ids[referenced], 1)
        self._now += len(rows)
        self._stats.reads += int(np.count_nonzero(referenced))

    def insertion_times(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` int64: the clock at which each of the live ``ids (M,)`` was stored (a merge keeps the
        time of the entry it folds into)."""
        return self._inserted_at[self._live_ids(ids, "insertion_times")]

    def live_ids(self) -> np.ndarray:
        """``(L,)`` int64: the ids of the live entries, ascending."""
        return np.flatnonzero(self._live).astype(np.int64)

    def lrfu_scores(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` float64: the LRFU CRF of the live ``ids (M,)`` at the current clock (the ``lrfu``
        eviction takes the lowest first)."""
        return self._lrfu.crf_at(self._live_ids(ids, "lrfu_scores"), self._now)

    def read_counts(self, ids: np.ndarray) -> np.ndarray:
        """``(M,)`` int64: how often each of the live ``ids (M,)`` was referenced since it was stored (a
        merge adds up the counts of the entries it folds together)."""
        return self._read_count[self._live_ids(ids, "read_counts")]

    def origins(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the live ``ids (M,)`` came from: the MLP unit each was seeded from ``(M,)`` int32 and the
        token ids of the text span that inserted it ``(M, ORIGIN_SPAN)`` int32, -1 where unknown (see
        :meth:`insert`; a merge keeps the origin of the entry it folds into)."""
        ids = self._live_ids(ids, "origins")
        return self._origin_unit[ids], self._origin_tokens[ids]

    def update_values(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        """``values[ids] += deltas`` for ``ids (M,)``, ``deltas (M, value_dim)`` (sparse SGD step).

        Duplicate ids accumulate; ids -1 and ids of entries that are no longer live are skipped.
        Sums are formed in float32 before the single cast to ``value_dtype``.
        """
        ids = self._check_ids(ids)
        deltas = as_float_matrix("deltas", deltas, self.value_dim)
        if len(ids) != len(deltas):
            raise ValueError(f"got {len(ids)} ids but {len(deltas)} deltas")
        keep = self._is_live(ids)
        if not keep.all():
            ids, deltas = ids[keep], deltas[keep]
        if self._values.dtype == np.float32:
            # In place through a shared torch view (memory-mapped values included): one multi-threaded
            # pass that also sums duplicate ids, where numpy's fancy-indexed += would drop them.
            torch.from_numpy(self._values).index_add_(0, torch.from_numpy(ids), torch.from_numpy(deltas))
            if self._device_keys is not None:
                self._copy_rows_to_device(np.unique(ids))
            return
        ids, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(ids), self.value_dim).index_add_(
            0, torch.from_numpy(inverse.ravel()), torch.from_numpy(deltas)
        )
        self._values[ids] = (self._values[ids].astype(np.float32) + summed.numpy()).astype(self.value_dtype)
        self._copy_rows_to_device(ids)

    def cast_values(self, value_dtype: str) -> None:
        """Store every value in ``value_dtype`` from now on (one of :data:`VALUE_DTYPES`); a memory-mapped
        store's values move into memory."""
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        self._values = np.asarray(self._values).astype(value_dtype)
        self.value_dtype = value_dtype
        if self._device_keys is not None:
            self._copy_to_device()

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(M, key_dim)`` float32 and values ``(M, value_dim)`` float32 of live ``ids (M,)``."""
        ids = self._live_ids(ids, "get")
        # Fancy indexing copies already; astype(copy=False) adds no second copy of float32 values.
        return self._keys[ids], self._values[ids].astype(np.float32, copy=False)

    def get_tensors(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`get` as new float32 tensors on :attr:`device`: on a device, gathered from the copies
        there (only ``ids`` cross from the host)."""
        if self._device_keys is None or self._device_values is None:
            keys, values = self.get(ids)
            return torch.from_numpy(keys), torch.from_numpy(values)
        rows = torch.from_numpy(self._live_ids(ids, "get_tensors")).to(self.device)
        return self._device_keys[rows], self._device_values[rows].float()

    def recombine(self, ids: np.ndarray, distances: np.ndarray, max_distance: float) -> int:
        """Merge near entries that were returned together for one query; returns entries removed.

        ``ids (N, k)`` and ``distances (N, k)`` are a :meth:`search` result.

        Per row, the live returned entries with ``distance <= max_distance`` (at least 2) are folded into
        the nearest: key and value become their mean weighted by ``1 / (distance + 1e-6)`` (distances
        clipped at 0, as ``ip`` distances can be negative), LRFU histories and read counts add up, the
        nearest keeps its insertion time and origin, and the others are removed. Entries merged away
        earlier in the call are skipped; the distances are those of the query, i.e. not recomputed after
        an earlier row moved a key.
        """
        self._refuse_if_keys_fixed("recombine")
        all_distances = np.asarray(distances)
        if np.ndim(ids) != 2 or np.shape(ids) != all_distances.shape:
            raise ValueError(
                f"ids and distances must have the same (N, k) shape, got {np.shape(ids)} and "
                f"{all_distances.shape}"
            )
        if not isinstance(max_distance, numbers.Real) or np.isnan(max_distance):
            raise ValueError(f"max_distance must be a number, got {max_distance!r}")
        all_ids = self._check_ids(ids).reshape(all_distances.shape)
        removed = 0
        targets = []  # slots whose key and value changed
        for row_ids, row_distances in zip(all_ids, all_distances, strict=True):
            near = self._is_live(row_ids) & (row_distances <= max_distance)
            if np.count_nonzero(near) < 2:
                continue
            members = row_ids[near]  # ascending distance: the nearest comes first
            weights = 1.0 / (np.maximum(row_distances[near], 0.0) + 1e-6)
            weights = (weights / weights.sum()).astype(np.float32)  # (m,)
            target, others = members[0], members[1:]
            self._keys[target] = weights @ self._keys[members]
            self._values[target] = (weights @ self._values[members].astype(np.float32)).astype(
                self.value_dtype
            )
            self._lrfu.merge(target, others)
            self._read_count[target] += self._read_count[others].sum()
            self._remove(others)
            self._index.add(np.array([target]), self._keys[target : target + 1])
            targets.append(target)
            removed += len(others)
        self._copy_rows_to_device(np.array(targets, dtype=np.int64))
        self._stats.merges += removed
        return removed

    # ------------------------------------------------------------------ persistence (dmt.memory.persistence)

    def save(self, directory: str | Path) -> None:
        """Atomically write the store to ``directory``, checksummed (see
        :func:`dmt.memory.persistence.save`)."""
        persistence.save(self, directory)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False, verify: bool = True) -> KNNStore:
        """Read and check a :meth:`save` directory; ``mmap`` maps the keys and values from their files,
        ``verify`` also hashes every file (see :func:`dmt.memory.persistence.load`).

        Raises:
            FileNotFoundError: ``directory`` has no ``manifest.json``.
            MemoryStoreError: naming the file that is wrong.
        """
        return persistence.load(cls, directory, mmap=mmap, verify=verify)

    def state_dict(self) -> dict[str, Any]:
        """The store as a plain dict of numpy arrays and scalars, for checkpoints (see
        :func:`dmt.memory.persistence.state_dict`)."""
        return persistence.state_dict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KNNStore:
        """Inverse of :meth:`state_dict` (see :func:`dmt.memory.persistence.from_state_dict`).

        Raises:
            MemoryStoreError: naming the entry that is wrong.
        """
        return persistence.from_state_dict(cls, state)


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
