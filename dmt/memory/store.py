"""``KNNStore``: a fixed-capacity key→value memory searched by hnswlib and evicted by LRFU.

Slots ``0 .. capacity - 1`` are both the rows of the store's own arrays and the hnswlib labels, so an
id returned by :meth:`KNNStore.query` indexes ``keys``/``values`` directly. An id stays valid until its
entry is evicted by :meth:`KNNStore.insert` or merged away by :meth:`KNNStore.recombine`; after that the
slot may be reused for a different entry, so ids must not be kept across inserts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from dmt.memory.base import MemoryStats, QueryResult, as_float_matrix
from dmt.memory.hnsw import HnswIndex
from dmt.memory.lrfu import LRFU
from dmt.memory.metrics import Metric, check_metric

FORMAT_VERSION = 1
VALUE_DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"
INDEX_FILE = "index.bin"
# Array name → file name in a saved directory; the same names are the keys of ``state_dict``.
ARRAY_FILES = {
    "keys": "keys.npy",
    "values": "values.npy",
    "live": "live.npy",
    "lrfu_crf": "lrfu_crf.npy",
    "lrfu_last": "lrfu_last.npy",
}


class KNNStore:
    """kNN memory of ``capacity`` (key, value) entries.

    Args:
        key_dim, value_dim: widths of keys and values.
        capacity: maximum number of entries; inserting into a full store evicts LRFU victims.
        metric: ``l2 | ip | cosine`` in the conventions of ``dmt.memory.metrics``.
        lrfu_lambda: LRFU λ in [0, 1]; 0 evicts the least frequently, 1 the least recently used.
        value_dtype: storage dtype of values (``float16`` halves memory; queries still return float32).
        index: :class:`HnswIndex` keyword arguments (``M``, ``ef_construction``, ``ef_search``,
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
        self._index = HnswIndex(key_dim, metric, capacity, **(index or {}))

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

    def query(self, queries: np.ndarray, k: int, reference: bool = True) -> QueryResult:
        """The ``k`` nearest entries of each of ``queries (N, key_dim)``.

        An empty store (cold start) answers with all ids -1. Advances the clock by one; with
        ``reference`` every returned id counts as one LRFU reference (duplicates across rows each count).
        """
        if not isinstance(k, (int, np.integer)) or k < 1 or k > self.capacity:
            raise ValueError(f"k must be an integer in [1, capacity={self.capacity}], got k={k!r}")
        queries = as_float_matrix("queries", queries, self.key_dim)
        self._now += 1
        ids, distances = self._index.search(queries, int(k))  # (N, k), (N, k)
        found = ids >= 0
        rows = np.where(found, ids, 0)  # any valid row index; padded entries are zeroed below
        keys = np.where(found[..., None], self._keys[rows], 0.0).astype(np.float32)
        values = np.where(found[..., None], self._values[rows], 0).astype(np.float32)
        if reference:
            self._lrfu.reference(ids[found], self._now)
        self._stats.queries += len(queries)
        return QueryResult(ids=ids, keys=keys, values=values, distances=distances)

    def insert(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Store ``keys (N, key_dim)`` / ``values (N, value_dim)``; returns their slot ids ``(N,)`` int64.

        Free slots are used first; the rest evict the live entries with the lowest LRFU score (never an
        entry of this call, since victims are chosen before any of it is stored). If ``N > capacity``
        only the last ``capacity`` rows are stored and the earlier rows get id -1.
        """
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

    def _remove(self, slots: np.ndarray) -> None:
        """Drop live ``slots (M,)`` from the index and the live mask (their slots become free)."""
        self._index.remove(slots)
        self._live[slots] = False

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as int64, raising ``ValueError`` unless every id is in range."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < -1 or ids.max() >= self.capacity):
            raise ValueError(f"ids must lie in [-1, {self.capacity}), got [{ids.min()}, {ids.max()}]")
        return ids

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
        uniq, inverse = np.unique(ids[keep], return_inverse=True)
        summed = np.zeros((len(uniq), self.value_dim), dtype=np.float32)
        np.add.at(summed, inverse, deltas[keep])
        self._values[uniq] = (self._values[uniq].astype(np.float32) + summed).astype(self.value_dtype)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(M, key_dim)`` float32 and values ``(M, value_dim)`` float32 of live ``ids (M,)``."""
        ids = self._check_ids(ids)
        if ids.size and (ids.min() < 0 or not self._live[ids].all()):
            raise ValueError("get() needs ids of live entries")
        return self._keys[ids].copy(), self._values[ids].astype(np.float32)

    def recombine(self, result: QueryResult, max_distance: float) -> int:
        """Merge near entries that were returned together for one query; returns entries removed.

        Per row, the live returned entries with ``distance <= max_distance`` (at least 2) are folded into
        the nearest: key and value become their mean weighted by ``1 / (distance + 1e-6)`` (distances
        clipped at 0, as ``ip`` distances can be negative), LRFU histories add up, and the others are
        removed. Entries merged away earlier in the call are skipped; the distances are those of the
        query, i.e. not recomputed after an earlier row moved a key.
        """
        removed = 0
        for ids, distances in zip(result.ids, result.distances, strict=True):
            near = (ids >= 0) & (distances <= max_distance)
            near[near] = self._live[ids[near]]
            if np.count_nonzero(near) < 2:
                continue
            members = ids[near]  # ascending distance: the nearest comes first
            weights = 1.0 / (np.maximum(distances[near], 0.0) + 1e-6)
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
        return {
            "format_version": FORMAT_VERSION,
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
        """Write ``manifest.json``, one ``.npy`` per array and ``index.bin`` into ``directory``.

        The manifest is written last, so a directory without one is an interrupted save.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in self._arrays().items():
            path = directory / ARRAY_FILES[name]
            if isinstance(array, np.memmap) and Path(array.filename).resolve() == path.resolve():
                array.flush()  # rewriting the file under its own memory map would corrupt it
            else:
                np.save(path, array, allow_pickle=False)
        self._index.save(directory / INDEX_FILE)
        (directory / MANIFEST).write_text(json.dumps(self._manifest(), indent=2))

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> KNNStore:
        """Read a :meth:`save` directory (never unpickles).

        With ``mmap`` the values stay in ``values.npy`` and are memory-mapped read/write, so a store may
        exceed RAM; every later value write (``insert``, ``update_values``, ``recombine``) then goes
        straight to that file.
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} is missing (not a saved KNNStore, or an interrupted save)"
            )
        manifest = json.loads(manifest_path.read_text())
        arrays = {
            name: np.load(
                directory / file, allow_pickle=False, mmap_mode="r+" if mmap and name == "values" else None
            )
            for name, file in ARRAY_FILES.items()
        }
        index_path = directory / INDEX_FILE
        return cls._restore(
            manifest,
            arrays,
            lambda live: HnswIndex.load(index_path, **cls._index_args(manifest), live=live),
            where=lambda name: str(directory / ARRAY_FILES[name]),
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays, ints, floats, strings and dicts of those (no pickled objects).

        Includes the hnswlib graph as a ``uint8`` array (``index_bytes``), so loading does not rebuild
        it. To pass ``torch.load(weights_only=True)`` the caller converts the arrays with
        ``torch.from_numpy`` (and back with ``.numpy()``); this dict stays numpy-only.
        """
        arrays = {name: np.array(array) for name, array in self._arrays().items()}  # copies, not memmaps
        return {**self._manifest(), **arrays, "index_bytes": self._index.to_bytes()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KNNStore:
        """Inverse of :meth:`state_dict`; arrays may be anything ``np.asarray`` accepts."""
        arrays = {name: np.asarray(state[name]) for name in ARRAY_FILES}
        return cls._restore(
            state,
            arrays,
            lambda live: HnswIndex.from_bytes(state["index_bytes"], **cls._index_args(state), live=live),
            where=lambda name: f"state_dict[{name!r}]",
        )

    @staticmethod
    def _index_args(manifest: dict[str, Any]) -> dict[str, Any]:
        return {
            "dim": manifest["key_dim"],
            "metric": manifest["metric"],
            "capacity": manifest["capacity"],
            **manifest["index_params"],
        }

    @classmethod
    def _restore(
        cls,
        manifest: dict[str, Any],
        arrays: dict[str, np.ndarray],
        make_index: Callable[[np.ndarray], HnswIndex],
        where: Callable[[str], str],
    ) -> KNNStore:
        """Build a store from a manifest and its arrays, checking every array against the manifest.

        Args:
            make_index: reads the hnswlib graph given the ``(capacity,)`` live mask.
            where: names an array's origin (file or state key) in error messages.
        """
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported KNNStore format_version {manifest.get('format_version')!r}")
        store = cls.__new__(cls)
        store._configure(
            manifest["key_dim"],
            manifest["value_dim"],
            manifest["capacity"],
            manifest["metric"],
            manifest["lrfu_lambda"],
            manifest["value_dtype"],
        )
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
                raise ValueError(
                    f"{where(name)}: expected shape {shape} dtype {np.dtype(dtype).name}, "
                    f"got shape {array.shape} dtype {array.dtype.name}"
                )
        live = arrays["live"]
        if int(np.count_nonzero(live)) != manifest["entries"]:
            raise ValueError(
                f"{where('live')}: {np.count_nonzero(live)} live entries, manifest says {manifest['entries']}"
            )
        store._keys, store._values, store._live = arrays["keys"], arrays["values"], live.copy()
        store._lrfu.load_state_dict(
            {"crf": arrays["lrfu_crf"], "last": arrays["lrfu_last"], "lam": store.lrfu_lambda}
        )
        store._index = make_index(live)
        store._now = int(manifest["now"])
        store._stats = MemoryStats(**manifest["stats"])
        return store
