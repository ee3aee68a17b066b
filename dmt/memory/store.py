"""``KNNStore``: a fixed-capacity key→value memory searched by a key index and evicted by LRFU.

Slots ``0 .. capacity - 1`` are both the rows of the store's own arrays and the index labels, so an
id returned by :meth:`KNNStore.query` indexes ``keys``/``values`` directly. An id stays valid until its
entry is evicted by :meth:`KNNStore.insert` or merged away by :meth:`KNNStore.recombine`; after that the
slot may be reused for a different entry, so ids must not be kept across inserts.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.memory.backends import HNSW_PARAMS, index_from_bytes, load_index, make_index
from dmt.memory.base import MemoryStats, QueryResult, as_float_matrix
from dmt.memory.index import KeyIndex
from dmt.memory.integrity import (
    MANIFEST,
    MemoryStoreError,
    file_record,
    fsync_path,
    read_manifest,
    verify_files,
    write_array,
    write_directory,
)
from dmt.memory.lrfu import LRFU
from dmt.memory.metrics import Metric, check_metric

# Directory format 2 added the per-file integrity records ("files") to the manifest; format 1
# directories (no records) still load, checked for shapes and counts only.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
# The state_dict layout did not change with the directory format, so checkpoints keep version 1.
STATE_FORMAT_VERSION = 1
VALUE_DTYPES = ("float32", "float16")
INDEX_FILE = "index.bin"
# Array name → file name in a saved directory; the same names are the keys of ``state_dict``.
ARRAY_FILES = {
    "keys": "keys.npy",
    "values": "values.npy",
    "live": "live.npy",
    "lrfu_crf": "lrfu_crf.npy",
    "lrfu_last": "lrfu_last.npy",
}
# Every file of a saved directory but the manifest, by the name ``_restore`` errors use for it.
STORE_FILES = {**ARRAY_FILES, "index_bytes": INDEX_FILE}


class KNNStore:
    """kNN memory of ``capacity`` (key, value) entries.

    Args:
        key_dim, value_dim: widths of keys and values.
        capacity: maximum number of entries; inserting into a full store evicts LRFU victims.
        metric: ``l2 | ip | cosine`` in the conventions of ``dmt.memory.metrics``.
        lrfu_lambda: LRFU λ in [0, 1]; 0 evicts the least frequently, 1 the least recently used.
        value_dtype: storage dtype of values (``float16`` halves memory; queries still return float32).
        index: key index settings: ``backend`` (``hnsw`` default, ``exact`` or ``auto``, see
            :mod:`dmt.memory.backends`) and the hnsw ones (``M``, ``ef_construction``, ``ef_search``,
            ``num_threads``).

    The clock advances by one per :meth:`query` call; inserts and references happen at the current time.
    """

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        capacity: int,
        metric: str = "ip",
        lrfu_lambda: float = 0.5,
        value_dtype: str = "float32",
        index: dict[str, int] | None = None,
    ) -> None:
        self._configure(key_dim, value_dim, capacity, metric, lrfu_lambda, value_dtype)
        self._keys = np.zeros((capacity, key_dim), dtype=np.float32)  # (C, key_dim)
        self._values = np.zeros((capacity, value_dim), dtype=value_dtype)  # (C, value_dim)
        self._live = np.zeros(capacity, dtype=bool)  # (C,)
        self._index = make_index(key_dim, metric, capacity, **(index or {}))
        if self._index.keys_are_fixed:  # product keys: every slot holds its key from the start
            self._keys[:] = self._index.keys(np.arange(capacity))
            self._live[:] = True

    def _configure(
        self, key_dim: int, value_dim: int, capacity: int, metric: str, lrfu_lambda: float, value_dtype: str
    ) -> None:
        """Validate and set everything except the arrays and the index (shared with restoring)."""
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
        self._lrfu = LRFU(self.capacity, self.lrfu_lambda)
        self._now = 0
        self._stats = MemoryStats()

    def __len__(self) -> int:
        """Number of live entries."""
        return int(np.count_nonzero(self._live))

    @property
    def stats(self) -> MemoryStats:
        """A snapshot of the cumulative counters with the current entry count."""
        return replace(self._stats, entries=len(self))

    @property
    def now(self) -> int:
        """The LRFU clock: number of :meth:`query` calls so far."""
        return self._now

    # ------------------------------------------------------------------ queries and updates

    @property
    def keys_are_fixed(self) -> bool:
        """True when the index fixes every slot's key (product keys): no inserts, only value updates."""
        return self._index.keys_are_fixed

    @property
    def index_backend(self) -> str:
        """The concrete key index in use: ``hnsw`` or ``exact``."""
        return self._index.backend

    def search(self, queries: np.ndarray, k: int, two_sided: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``(N, k)`` int64 (-1 padding) and distances ``(N, k)`` float32 (+inf padding) of the ``k``
        nearest entries of each of ``queries (N, key_dim)``, nearest first; no keys or values are copied.

        ``two_sided`` (``ip`` and ``cosine`` stores): the ``k`` entries of largest ``|similarity|`` instead,
        largest first, with their ordinary distances ``1 - similarity`` (see :func:`merge_two_sided`).

        An empty store (cold start) answers with all ids -1, and ``N = 0`` with empty ``(0, k)`` results.
        Advances the clock by one per call (also for ``N = 0``, so the clock counts calls alike on every
        data-parallel replica). References are not counted: see :meth:`reference`.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > self.capacity:
            raise ValueError(f"k must be an integer in [1, capacity={self.capacity}], got k={k!r}")
        if two_sided and self.metric == "l2":
            raise ValueError("a two-sided search ranks by |similarity|: needs an ip or cosine store, not l2")
        queries = as_float_matrix("queries", queries, self.key_dim)
        self._now += 1
        self._stats.queries += len(queries)
        if not two_sided:
            return self._index.search(queries, int(k))  # (N, k), (N, k)
        return merge_two_sided(self._index.search(queries, int(k)), self._index.search(-queries, int(k)))

    def query(self, queries: np.ndarray, k: int, reference: bool = True) -> QueryResult:
        """:meth:`search` plus the returned entries' keys and values (zeros for padding).

        With ``reference`` every returned id counts as one LRFU reference (duplicates across rows each
        count).
        """
        ids, distances = self.search(queries, k)
        found = ids >= 0
        rows = np.where(found, ids, 0)  # any valid row index; padded entries are zeroed below
        keys = np.where(found[..., None], self._keys[rows], 0.0).astype(np.float32)
        values = np.where(found[..., None], self._values[rows], 0).astype(np.float32)
        if reference:
            self._lrfu.reference(ids[found], self._now)
        return QueryResult(ids=ids, keys=keys, values=values, distances=distances)

    def insert(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Store ``keys (N, key_dim)`` / ``values (N, value_dim)``; returns their slot ids ``(N,)`` int64.

        Free slots are used first; the rest evict the live entries with the lowest LRFU score (never an
        entry of this call, since victims are chosen before any of it is stored). If ``N > capacity``
        only the last ``capacity`` rows are stored and the earlier rows get id -1.
        """
        self._refuse_if_keys_fixed("insert")
        keys = as_float_matrix("keys", keys, self.key_dim)
        values = as_float_matrix("values", values, self.value_dim, dtype=self.value_dtype)
        if len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys but {len(values)} values")
        ids = np.full(len(keys), -1, dtype=np.int64)
        stored = min(len(keys), self.capacity)
        if stored == 0:
            return ids
        keys, values = keys[-stored:], values[-stored:]
        # Free slots are derived from the live mask (O(capacity), like the victim scan) so they can
        # never disagree with it.
        free = np.flatnonzero(~self._live)[:stored]
        victims = self._lrfu.victims(self._live, stored - len(free), self._now)
        self._remove(victims)
        self._stats.evictions += len(victims)
        slots = np.concatenate([free, victims])
        self._keys[slots], self._values[slots] = keys, values
        self._live[slots] = True
        self._lrfu.reset(slots, self._now)
        self._index.add(slots, keys)
        self._stats.inserts += stored
        ids[-stored:] = slots
        return ids

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

    def reference(self, ids: np.ndarray) -> None:
        """Count one LRFU reference at the current clock per element of ``ids (M,)`` (-1 ignored).

        For callers that search with ``query(..., reference=False)`` and apply references later, e.g. once
        per training step on every data-parallel replica.
        """
        ids = self._check_ids(ids)
        ids = ids[ids >= 0]
        self._lrfu.reference(ids[self._live[ids]], self._now)

    def update_values(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        """``values[ids] += deltas`` for ``ids (M,)``, ``deltas (M, value_dim)`` (sparse SGD step).

        Duplicate ids accumulate; ids -1 and ids of entries that are no longer live are skipped.
        Sums are formed in float32 before the single cast to ``value_dtype``.
        """
        ids = self._check_ids(ids)
        deltas = as_float_matrix("deltas", deltas, self.value_dim)
        if len(ids) != len(deltas):
            raise ValueError(f"got {len(ids)} ids but {len(deltas)} deltas")
        keep = ids >= 0
        keep[keep] = self._live[ids[keep]]
        if not keep.all():
            ids, deltas = ids[keep], deltas[keep]
        if self._values.dtype == np.float32:
            # In place through a shared torch view (memory-mapped values included): one multi-threaded
            # pass that also sums duplicate ids, where numpy's fancy-indexed += would drop them.
            torch.from_numpy(self._values).index_add_(0, torch.from_numpy(ids), torch.from_numpy(deltas))
            return
        ids, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(ids), self.value_dim).index_add_(
            0, torch.from_numpy(inverse.ravel()), torch.from_numpy(deltas)
        )
        self._values[ids] = (self._values[ids].astype(np.float32) + summed.numpy()).astype(self.value_dtype)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(M, key_dim)`` float32 and values ``(M, value_dim)`` float32 of live ``ids (M,)``."""
        ids = self._check_ids(ids)
        if ids.size and (ids.min() < 0 or not self._live[ids].all()):
            raise ValueError("get() needs ids of live entries")
        # Fancy indexing copies already; astype(copy=False) adds no second copy of float32 values.
        return self._keys[ids], self._values[ids].astype(np.float32, copy=False)

    def recombine(self, ids: np.ndarray, distances: np.ndarray, max_distance: float) -> int:
        """Merge near entries that were returned together for one query; returns entries removed.

        ``ids (N, k)`` and ``distances (N, k)`` are a :meth:`search` result.

        Per row, the live returned entries with ``distance <= max_distance`` (at least 2) are folded into
        the nearest: key and value become their mean weighted by ``1 / (distance + 1e-6)`` (distances
        clipped at 0, as ``ip`` distances can be negative), LRFU histories add up, and the others are
        removed. Entries merged away earlier in the call are skipped; the distances are those of the
        query, i.e. not recomputed after an earlier row moved a key.
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
        for row_ids, row_distances in zip(all_ids, all_distances, strict=True):
            near = (row_ids >= 0) & (row_distances <= max_distance)
            near[near] = self._live[row_ids[near]]
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
            self._remove(others)
            self._index.add(np.array([target]), self._keys[target : target + 1])
            removed += len(others)
        self._stats.merges += removed
        return removed

    # ------------------------------------------------------------------ persistence

    def _manifest(self) -> dict[str, Any]:
        """Settings, counters and clock: what a saved manifest and a state dict share besides arrays."""
        return {
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "capacity": self.capacity,
            "metric": self.metric,
            "lrfu_lambda": self.lrfu_lambda,
            "value_dtype": self.value_dtype,
            "index_params": self._index.params,
            "entries": len(self),
            "now": self._now,
            "stats": asdict(self._stats),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "keys": self._keys,
            "values": self._values,
            "live": self._live,
            "lrfu_crf": self._lrfu.crf,
            "lrfu_last": self._lrfu.last,
        }

    def save(self, directory: str | Path) -> None:
        """Atomically write the store to ``directory``: ``manifest.json``, one ``.npy`` per array and
        ``index.bin``, with the size and SHA-256 of every file recorded in the manifest.

        Everything is written and fsynced in a temporary sibling of ``directory`` that then replaces it
        (:func:`dmt.memory.integrity.write_directory`): a failed save (full disk, crash) leaves the
        previous store loadable and no temporary directory behind. An existing ``directory`` holding
        files that are not part of a store is refused rather than deleted.

        A store loaded with ``mmap=True`` follows its latest save: its values are then mapped from the
        new ``directory/values.npy`` (the file it was loaded from may just have been deleted), so later
        value writes land there. The mapping follows the file if ``directory`` is moved afterwards.

        Raises:
            OSError: naming ``directory`` when writing fails; the original error is the cause.
        """
        directory = Path(directory)
        write_directory(directory, self._write_files, known_names=(MANIFEST, *STORE_FILES.values()))
        if isinstance(self._values, np.memmap):
            self._values = np.load(directory / STORE_FILES["values"], mmap_mode="r+")

    def _write_files(self, directory: Path) -> None:
        """Write every file of a save into the empty ``directory``, the manifest with their records last."""
        files = {
            STORE_FILES[name]: write_array(directory / STORE_FILES[name], array)
            for name, array in self._arrays().items()
        }
        index_path = directory / INDEX_FILE
        self._index.save(index_path)
        fsync_path(index_path)
        files[INDEX_FILE] = file_record(index_path)
        manifest_path = directory / MANIFEST
        manifest_path.write_text(
            json.dumps({"format_version": FORMAT_VERSION, **self._manifest(), "files": files}, indent=2)
        )
        fsync_path(manifest_path)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False, verify: bool = True) -> KNNStore:
        """Read a :meth:`save` directory (never unpickles), checking it against its manifest.

        Every file's size is always compared with the manifest, and shapes, dtypes and the live count
        with the manifest's settings. ``verify`` also hashes every file: one extra full read of the store
        (about a second per GB). ``verify=False`` skips only that pass, for huge stores on trusted disks;
        a corruption that keeps a file's size then goes unnoticed.

        With ``mmap`` the values stay in ``values.npy`` and are memory-mapped read/write, so a store may
        exceed RAM; every later value write (``insert``, ``update_values``, ``recombine``) goes straight
        to that file. The file then no longer matches its checksum until the next :meth:`save`: if the
        process stops before that, the directory loads only with ``verify=False``.

        Raises:
            FileNotFoundError: ``directory`` has no ``manifest.json``.
            MemoryStoreError: a ``ValueError`` naming the file that is unreadable, missing, truncated,
                changed or inconsistent with the manifest.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        version = manifest.get("format_version")
        if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
            raise MemoryStoreError(
                f"{directory / MANIFEST}: format_version {version!r} is not supported "
                f"(readable: {', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
            )
        if version >= 2:  # format 1 predates the integrity records
            verify_files(directory, manifest.get("files"), STORE_FILES.values(), checksums=verify)
        arrays = {
            name: _load_npy(directory / STORE_FILES[name], mmap=mmap and name == "values")
            for name in ARRAY_FILES
        }
        index_path = directory / INDEX_FILE
        return cls._restore(
            manifest,
            arrays,
            lambda live: load_index(index_path, **cls._index_args(manifest), live=live),
            where=lambda name: str(directory / STORE_FILES[name]),
            source=str(directory / MANIFEST),
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays, ints, floats, strings and dicts of those (no pickled objects).

        Includes the key index file (e.g. the hnswlib graph) as a ``uint8`` array (``index_bytes``), so
        loading does not rebuild it. To pass ``torch.load(weights_only=True)`` the caller converts the
        arrays with ``torch.from_numpy`` (and back with ``.numpy()``); this dict stays numpy-only.
        """
        arrays = {name: np.array(array) for name, array in self._arrays().items()}  # copies, not memmaps
        return {
            "format_version": STATE_FORMAT_VERSION,
            **self._manifest(),
            **arrays,
            "index_bytes": self._index.to_bytes(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KNNStore:
        """Inverse of :meth:`state_dict`; arrays may be anything ``np.asarray`` accepts.

        Raises:
            MemoryStoreError: a ``ValueError`` naming the entry that is missing or of the wrong type,
                shape or dtype.
        """
        if not isinstance(state, Mapping):
            raise MemoryStoreError(f"state_dict: expected a mapping, got {type(state).__name__}")
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise MemoryStoreError(
                f"state_dict['format_version']: {state.get('format_version')!r} is not supported "
                f"(expected {STATE_FORMAT_VERSION})"
            )
        arrays = {name: _state_array(state, name) for name in STORE_FILES}
        index_bytes = arrays.pop("index_bytes")
        if index_bytes.ndim != 1 or index_bytes.dtype != np.uint8:
            raise MemoryStoreError(
                f"state_dict['index_bytes']: expected a 1-D uint8 array, "
                f"got shape {index_bytes.shape} dtype {index_bytes.dtype.name}"
            )
        return cls._restore(
            state,
            arrays,
            lambda live: index_from_bytes(index_bytes, **cls._index_args(state), live=live),
            where=lambda name: f"state_dict[{name!r}]",
            source="state_dict",
        )

    @staticmethod
    def _index_args(manifest: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "dim": manifest["key_dim"],
            "metric": manifest["metric"],
            "capacity": manifest["capacity"],
            **manifest["index_params"],
        }

    @classmethod
    def _restore(
        cls,
        manifest: Mapping[str, Any],
        arrays: dict[str, np.ndarray],
        make_index: Callable[[np.ndarray], KeyIndex],
        where: Callable[[str], str],
        source: str,
    ) -> KNNStore:
        """Build a store from a manifest and its arrays, checking every field and array against it.

        Args:
            manifest: the :meth:`_manifest` fields (settings, counters, clock).
            arrays: every ``ARRAY_FILES`` name → its array.
            make_index: reads the key index given the ``(capacity,)`` live mask.
            where: names the origin (file or state key) of an array or of ``"index_bytes"`` in errors.
            source: names the origin of the manifest fields in errors.
        Raises:
            MemoryStoreError: naming the field or the array that is wrong.
        """
        _check_manifest_fields(manifest, source)
        store = cls.__new__(cls)
        try:
            store._configure(
                manifest["key_dim"],
                manifest["value_dim"],
                manifest["capacity"],
                manifest["metric"],
                manifest["lrfu_lambda"],
                manifest["value_dtype"],
            )
        except ValueError as error:
            raise MemoryStoreError(f"{source}: {error}") from error
        capacity = store.capacity
        expected = {
            "keys": ((capacity, store.key_dim), np.float32),
            "values": ((capacity, store.value_dim), np.dtype(store.value_dtype)),
            "live": ((capacity,), np.bool_),
            "lrfu_crf": ((capacity,), np.float64),
            "lrfu_last": ((capacity,), np.int64),
        }
        for name, (shape, dtype) in expected.items():
            array = arrays[name]
            if array.shape != shape or array.dtype != dtype:
                raise MemoryStoreError(
                    f"{where(name)}: expected shape {shape} dtype {np.dtype(dtype).name} (from {source}), "
                    f"got shape {array.shape} dtype {array.dtype.name}"
                )
        live = arrays["live"]
        if int(np.count_nonzero(live)) != manifest["entries"]:
            raise MemoryStoreError(
                f"{where('live')}: {np.count_nonzero(live)} live entries, {source} says {manifest['entries']}"
            )
        store._keys, store._values, store._live = arrays["keys"], arrays["values"], live.copy()
        store._lrfu.load_state_dict(
            {"crf": arrays["lrfu_crf"], "last": arrays["lrfu_last"], "lam": store.lrfu_lambda}
        )
        try:
            store._index = make_index(live)
        except (RuntimeError, ValueError) as error:  # hnswlib reports a corrupt graph as RuntimeError
            raise MemoryStoreError(f"{where('index_bytes')}: not a usable key index ({error})") from error
        store._now = int(manifest["now"])
        store._stats = MemoryStats(**{name: int(count) for name, count in manifest["stats"].items()})
        return store


# Manifest field → accepted types (bools are rejected separately although they are Integral).
_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key_dim": numbers.Integral,
    "value_dim": numbers.Integral,
    "capacity": numbers.Integral,
    "metric": str,
    "lrfu_lambda": numbers.Real,
    "value_dtype": str,
    "index_params": Mapping,
    "entries": numbers.Integral,
    "now": numbers.Integral,
    "stats": Mapping,
}
# Integer-valued sub-dicts of the manifest → the names they may hold (``index_params`` may also name its
# ``backend``, checked separately as a string).
_COUNTER_FIELDS = {
    "stats": tuple(field.name for field in fields(MemoryStats)),
    "index_params": HNSW_PARAMS,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_manifest_fields(manifest: Mapping[str, Any], source: str) -> None:
    """Presence and types of the manifest fields; their values are checked by ``_configure`` and
    against the arrays."""
    for name, kind in _MANIFEST_FIELDS.items():
        if name not in manifest:
            raise MemoryStoreError(f"{source}: missing field {name!r}")
        value = manifest[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MemoryStoreError(f"{source}: field {name!r} has the wrong type ({value!r})")
    backend = manifest["index_params"].get("backend", "hnsw")
    if backend not in ("hnsw", "exact", "product"):
        raise MemoryStoreError(f"{source}: field 'index_params' names an unknown backend {backend!r}")
    for name, allowed in _COUNTER_FIELDS.items():
        counters = {k: v for k, v in manifest[name].items() if k != "backend"}
        if not set(counters) <= set(allowed) or not all(map(_is_int, counters.values())):
            raise MemoryStoreError(
                f"{source}: field {name!r} must map some of {', '.join(allowed)} to integers, "
                f"got {dict(counters)!r}"
            )
    if manifest["now"] < 0:
        raise MemoryStoreError(f"{source}: field 'now' must be >= 0, got {manifest['now']}")


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """The array saved at ``path`` (never unpickled); memory-mapped read/write with ``mmap``."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r+" if mmap else None)
    except (OSError, ValueError, EOFError) as error:
        raise MemoryStoreError(f"{path}: not a readable .npy array ({error})") from error


def _state_array(state: Mapping[str, Any], name: str) -> np.ndarray:
    """``state[name]`` as a numpy array, naming the entry if it is missing or not array-like."""
    if name not in state:
        raise MemoryStoreError(f"state_dict: missing entry {name!r}")
    try:
        return np.asarray(state[name])
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise MemoryStoreError(f"state_dict[{name!r}]: not an array ({error})") from error


def merge_two_sided(
    positive: tuple[np.ndarray, np.ndarray], negative: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` entries of largest ``|s|`` (``s = 1 - distance``, an ``ip``/``cosine`` similarity) from the
    top-k of the query (``positive``) and of the negated query (``negative``), each ``(ids, distances)``
    of shape ``(N, k)``. Returns ``(ids, distances)`` ``(N, k)``, largest ``|s|`` first, distances of the
    query itself (``1 - s``), padding -1 / +inf.

    Exact: an entry with ``s >= 0`` among the overall top-k by ``|s|`` is within the query's top-k, one
    with ``s < 0`` within the negated query's. Keeping each list's own sign makes the two disjoint.
    """
    (pos_ids, pos_dist), (neg_ids, neg_dist) = positive, negative
    k = pos_ids.shape[1]
    with np.errstate(invalid="ignore"):  # inf padding distances give nan similarities, masked below
        similarity = np.concatenate([1.0 - pos_dist, neg_dist - 1.0], axis=1)  # (N, 2k), of the query
    ids = np.concatenate([pos_ids, neg_ids], axis=1)  # (N, 2k)
    own_side = np.concatenate([similarity[:, :k] >= 0, similarity[:, k:] < 0], axis=1) & (ids >= 0)
    magnitude = np.where(own_side, np.abs(similarity), -1.0)
    order = np.argsort(-magnitude, axis=1, kind="stable")[:, :k]  # (N, k)
    kept = np.take_along_axis(own_side, order, axis=1)
    ids = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
    distances = np.where(kept, 1.0 - np.take_along_axis(similarity, order, axis=1), np.inf)
    return ids.astype(np.int64), distances.astype(np.float32)
