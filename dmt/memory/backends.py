"""Choosing and building a key index backend from index settings (``memory.index`` in configs).

- ``hnsw`` (:class:`dmt.memory.hnsw.HnswIndex`): hnswlib's approximate graph; search cost grows roughly
  with log(size), inserts into a large graph are slow (each one links a point into the graph).
- ``exact`` (:class:`dmt.memory.exact.ExactIndex`): brute-force matmul top-k; recall 1 and inserts that are
  row copies, at a search cost linear in the capacity.
- ``product`` (:class:`dmt.memory.product.ProductKeyIndex`): ``n²`` fixed product keys searched exactly at
  a cost of ``2n`` sub-keys; the store is full from the start and learns only its values. Never chosen by
  ``auto``: fixed keys are a modelling choice.
- ``faiss`` (:class:`dmt.memory.faiss_ivf.FaissIndex`): faiss's inverted file (IVF-Flat), trained on the
  store's own keys once it holds enough of them (exact search before), ``nprobe`` calibrated on real
  queries; inserts and evictions add and remove by id.
- ``scann`` (:class:`dmt.memory.scann_index.ScannIndex`): ScaNN's partitions scored by 4-bit anisotropic
  codes and re-ranked exactly, trained like faiss's lists, its breadth calibrated the same way; reads a
  large store several times faster than faiss at the same recall, but tracks no drift of inserted keys:
  for packs that are read, not trained. Never chosen by ``auto``.

``auto`` takes ``exact`` while ``capacity · dim`` is at most :data:`EXACT_MAX_WORK` (a 131,072-entry store
of 64-d keys), whose search returns the true neighbours at a cost linear in the size, and ``faiss`` above:
on keys a model makes, faiss's inverted file searched a million entries at recall@k >= 0.95 for a small
fraction of exact search's time and of hnswlib's, and filled them in seconds where hnswlib takes many
minutes (docs/results.md, "Key indexes on real keys").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dmt.memory.exact import ExactIndex
from dmt.memory.faiss_ivf import FaissIndex
from dmt.memory.hnsw import HnswIndex
from dmt.memory.index import KeyIndex
from dmt.memory.product import ProductKeyIndex
from dmt.memory.scann_index import ScannIndex

BACKENDS: tuple[str, ...] = ("auto", "hnsw", "exact", "product", "faiss", "scann")
EXACT_MAX_WORK = 131072 * 64
HNSW_PARAMS = ("M", "ef_construction", "ef_search", "num_threads")
FAISS_PARAMS = ("nlist", "nprobe")
SCANN_PARAMS = ("leaves", "leaves_to_search")
INDEX_PARAMS = (*HNSW_PARAMS, *FAISS_PARAMS, *SCANN_PARAMS)
# The settings each backend reads; ``auto`` takes faiss's, read when it becomes faiss (a large store), and
# accepts hnsw's, which configs and checkpoints hold from when a large ``auto`` store was hnsw (ignored now).
# Stores built in code may pass every backend's settings (each backend ignores the others'); a config is
# held to its backend's own (check_index_settings), so that a setting it names is one that applies.
BACKEND_PARAMS: dict[str, tuple[str, ...]] = {
    "auto": (*FAISS_PARAMS, *HNSW_PARAMS),
    "hnsw": HNSW_PARAMS,
    "exact": (),
    "product": (),
    "faiss": FAISS_PARAMS,
    "scann": SCANN_PARAMS,
}


def own_index_settings(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the settings its backend does not read (which it ignores); an unknown backend's
    are left for :func:`check_index_settings` to refuse."""
    own = BACKEND_PARAMS.get(params.get("backend", "hnsw"))
    return dict(params) if own is None else {k: v for k, v in params.items() if k == "backend" or k in own}


class IndexSettingError(ValueError):
    """An index setting ``key`` that the chosen backend does not take."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def resolve_backend(backend: str, dim: int, capacity: int) -> str:
    """The concrete backend (``hnsw``, ``exact``, ``product``, ``faiss`` or ``scann``) that ``backend``
    names for this shape."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "exact" if capacity * dim <= EXACT_MAX_WORK else "faiss"
    return backend


def _split_params(params: dict[str, Any], dim: int, capacity: int) -> tuple[str, dict[str, Any]]:
    """``(concrete backend, the settings it reads)`` from index settings, rejecting names no backend
    knows; the other backends' settings are ignored, so that one mapping of settings serves them all."""
    params = dict(params)
    backend = resolve_backend(params.pop("backend", "hnsw"), dim, capacity)
    unknown = sorted(set(params) - set(INDEX_PARAMS))
    if unknown:
        raise ValueError(f"unknown index setting(s) {unknown}; known: ['backend', *{list(INDEX_PARAMS)}]")
    return backend, {name: value for name, value in params.items() if name in BACKEND_PARAMS[backend]}


def check_index_settings(params: dict[str, Any], dim: int, metric: str, capacity: int) -> str:
    """Validate index settings for a store of this shape without building anything; returns the concrete
    backend. Raises ``ValueError`` naming the setting that cannot work (for config validation), and
    :class:`IndexSettingError` for a setting that the backend named does not take: in a config it would
    be silently ignored."""
    named = params.get("backend", "hnsw")
    foreign = sorted(set(params) - {"backend", *BACKEND_PARAMS.get(named, ())})
    if foreign and named in BACKEND_PARAMS:
        has = ", ".join(BACKEND_PARAMS[named]) or "none"
        raise IndexSettingError(foreign[0], f"not a setting of the {named} backend; it has {has}")
    backend, own = _split_params(params, dim, capacity)
    if backend == "product":
        ProductKeyIndex.check_shape(dim, metric, capacity)
    elif backend == "faiss":
        FaissIndex.check_settings(own.get("nlist"), own.get("nprobe"))
    elif backend == "scann":
        ScannIndex.check_settings(own.get("leaves"), own.get("leaves_to_search"))
    return backend


def index_class(backend: str) -> type[KeyIndex]:
    """The class of a concrete backend."""
    classes = (HnswIndex, ExactIndex, ProductKeyIndex, FaissIndex, ScannIndex)
    return {cls.backend: cls for cls in classes}[backend]


def make_index(dim: int, metric: str, capacity: int, **params: Any) -> KeyIndex:
    """A new index: ``backend`` (``auto`` | ``hnsw`` | ``exact`` | ``product`` | ``faiss`` | ``scann``,
    default ``hnsw``) plus the hnsw settings ``M``, ``ef_construction``, ``ef_search``, ``num_threads``,
    the faiss ones ``nlist``, ``nprobe`` and the scann ones ``leaves``, ``leaves_to_search`` (each ignored
    by the other backends)."""
    backend, own = _split_params(params, dim, capacity)
    return index_class(backend)(dim, metric, capacity, **own)


def load_index(
    source: str | Path | np.ndarray, dim: int, metric: str, capacity: int, live: np.ndarray, **params: Any
) -> KeyIndex:
    """Read an index written by the backend that ``params`` (an index's :attr:`params`) names: from the
    file ``source``, or from that file's bytes (:meth:`KeyIndex.to_bytes`, a ``uint8`` array)."""
    backend, own = _split_params(params, dim, capacity)
    cls = index_class(backend)
    if isinstance(source, np.ndarray):
        return cls.from_bytes(source, dim, metric, capacity, live, **own)
    return cls.load(source, dim, metric, capacity, live, **own)
