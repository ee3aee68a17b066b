"""Choosing and building a key index backend from index settings (``memory.index`` in configs).

- ``hnsw`` (:class:`dmt.memory.hnsw.HnswIndex`): hnswlib's approximate graph; search cost grows roughly
  with log(size), inserts into a large graph are slow (~1 ms each at 1M entries).
- ``exact`` (:class:`dmt.memory.exact.ExactIndex`): brute-force matmul top-k; recall 1 and inserts that are
  row copies, at a search cost linear in the capacity.
- ``product`` (:class:`dmt.memory.product.ProductKeyIndex`): ``n²`` fixed product keys searched exactly at
  a cost of ``2n`` sub-keys; the store is full from the start and learns only its values. Never chosen by
  ``auto``: fixed keys are a modelling choice.

``auto`` takes ``exact`` while ``capacity · dim`` is at most :data:`EXACT_MAX_WORK` (a 131,072-entry store
of 64-d keys): measured on 2 CPU cores, exact search there costs about what hnswlib costs at ``ef_search=64``
while returning the true neighbours, and beyond it hnswlib's sublinear search wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dmt.memory.exact import ExactIndex
from dmt.memory.hnsw import HnswIndex
from dmt.memory.index import KeyIndex
from dmt.memory.product import ProductKeyIndex

BACKENDS: tuple[str, ...] = ("auto", "hnsw", "exact", "product")
EXACT_MAX_WORK = 131072 * 64
# Settings only the hnsw backend reads; `exact` accepts and ignores them so one config serves both.
HNSW_PARAMS = ("M", "ef_construction", "ef_search", "num_threads")


def resolve_backend(backend: str, dim: int, capacity: int) -> str:
    """The concrete backend (``hnsw``, ``exact`` or ``product``) that ``backend`` names for this shape."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "exact" if capacity * dim <= EXACT_MAX_WORK else "hnsw"
    return backend


def _split_params(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(backend, hnsw settings)`` from index settings, rejecting names no backend knows."""
    params = dict(params)
    backend = params.pop("backend", "hnsw")
    unknown = sorted(set(params) - set(HNSW_PARAMS))
    if unknown:
        raise ValueError(f"unknown index setting(s) {unknown}; known: ['backend', *{list(HNSW_PARAMS)}]")
    return backend, params


def check_index_settings(params: dict[str, Any], dim: int, metric: str, capacity: int) -> str:
    """Validate index settings for a store of this shape without building anything; returns the concrete
    backend. Raises ``ValueError`` naming the setting that cannot work (for config validation)."""
    backend, _ = _split_params(params)
    backend = resolve_backend(backend, dim, capacity)
    if backend == "product":
        ProductKeyIndex.check_shape(dim, metric, capacity)
    return backend


def index_class(backend: str) -> type[KeyIndex]:
    """The class of a concrete backend."""
    return {"hnsw": HnswIndex, "exact": ExactIndex, "product": ProductKeyIndex}[backend]


def make_index(dim: int, metric: str, capacity: int, **params: Any) -> KeyIndex:
    """A new index: ``backend`` (``auto`` | ``hnsw`` | ``exact`` | ``product``, default ``hnsw``) plus the
    hnsw settings ``M``, ``ef_construction``, ``ef_search``, ``num_threads`` (ignored by the others)."""
    backend, hnsw_params = _split_params(params)
    backend = resolve_backend(backend, dim, capacity)
    if backend == "hnsw":
        return HnswIndex(dim, metric, capacity, **hnsw_params)
    return index_class(backend)(dim, metric, capacity)


def load_index(
    source: str | Path | np.ndarray, dim: int, metric: str, capacity: int, live: np.ndarray, **params: Any
) -> KeyIndex:
    """Read an index written by the backend that ``params`` (an index's :attr:`params`) names: from the
    file ``source``, or from that file's bytes (:meth:`KeyIndex.to_bytes`, a ``uint8`` array)."""
    backend, hnsw_params = _split_params(params)
    cls = index_class(resolve_backend(backend, dim, capacity))
    if isinstance(source, np.ndarray):
        return cls.from_bytes(source, dim, metric, capacity, live, **hnsw_params)
    return cls.load(source, dim, metric, capacity, live, **hnsw_params)
