"""Multiply-adds per token of the layers swapped in for MLPs, beside those of the MLPs they replace.

Conventions, the same for a memory layer, a baseline and the MLP:

- A multiply-add is one product accumulated into a sum: an inner product of ``D`` terms costs ``D``, a
  matrix product ``(1, D_in) @ (D_in, D_out)`` costs ``D_in · D_out``. Counts are per token (every head of
  it) and for the forward pass.
- Not multiply-adds, not counted: comparisons (top-k selection, the ``k × k`` merge of a product-key
  search, which adds and compares sub-key scores), softmax and activations, elementwise scalings (a
  SwiGLU's ``act(g) · u``, a weight times its gate score), biases, the ``O(Dk)`` vector norms of the
  ``l2`` and ``cosine`` metrics, and store bookkeeping (LRFU references, inserts, copying returned entries).

A memory layer's count has three parts (``H`` heads, per head ``Dk`` key, ``Dv`` value and ``G`` gate-key
widths, ``K`` neighbours read: ``topk``, or fewer while the store holds fewer entries):

- ``projections``: its dense ``Linear`` layers (query, gate query, output; associative adds key and
  value), ``d_in · d_out`` each. Without dense weights (``dense_weights: false``) the query is ``[x, 1]``
  and the output a bias: 0.
- ``search``, per head query, by the store's index: ``exact`` scores every live entry, ``entries · Dk``
  (the index's one matmul also spans free rows below its high-water mark and a fused offset column, which
  a store filled from its lowest slots does not have); ``product`` scores ``2n`` sub-keys of ``Dk/2``,
  ``n · Dk``; ``hnsw`` walks a graph whose hops hnswlib does not report, so its count is an *estimate*,
  ``max(ef, K) · M`` distance evaluations of ``Dk`` (``MultiplyAdds.search_estimated``); a trained
  ``faiss`` index scores its ``nlist`` centroids and the keys of its ``nprobe`` lists, estimated as
  ``entries · nprobe / nlist`` (exact search before training). Ranking by
  ``|q·k|`` (``ranking: magnitude``) costs the index's ``magnitude_searches``: ``exact`` and ``product``
  rank in one pass over their scores, ``hnsw`` searches twice, for ``q`` and ``-q``.
- ``read``, per head query: the distances to the ``K`` returned keys recomputed (differentiably),
  ``K · Dk``; featural gate dots ``K · G``; the value mix ``K · Dv``. (When a batch's distinct returned
  entries are few, :func:`dmt.kernel.ops.neighbour_dots` scores each query against all of them
  in one matmul, a speed choice: the count is of the products the layer uses.)

The replaced MLP costs ``3 · C · U`` (gated, SwiGLU) or ``2 · C · U`` for ``U`` units of width ``C``; the
``lowrank`` baseline is such an MLP of ``r`` units, and ``removed`` costs 0.

This package does not read models (see :mod:`dmt.layers.mlp`): callers pass the swapped layers and the
MLP's form, e.g. ``swap_arithmetic(swapped_layers(student), mlp_form(student.config))``; the student's
config is the teacher's, so no teacher is needed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from dmt.layers.associative import AssociativeMemory
from dmt.layers.base import MemoryLayer
from dmt.layers.baselines import LowRankMLP, RemovedMLP
from dmt.layers.featural import FeaturalMemory
from dmt.layers.mlp import MLPForm
from dmt.memory.backends import index_class
from dmt.memory.hnsw import HnswIndex, derived_ef
from dmt.memory.scann_index import MIN_REORDER, REORDER_PER_K

# The graph degree of an hnsw index whose settings leave ``M`` out.
HNSW_DEFAULT_M: int = inspect.signature(HnswIndex).parameters["M"].default


@dataclass(frozen=True)
class MultiplyAdds:
    """Multiply-adds one token costs a swapped layer, by part (see the module docstring)."""

    projections: int = 0  # dense Linear layers (lowrank: its whole MLP)
    search: int = 0  # finding the top-k: stored keys, sub-keys or graph hops scored
    read: int = 0  # the returned entries: distances recomputed, gate dots, value mix
    search_estimated: bool = False  # an hnsw graph walk or list sizes: an estimate, not a count

    @property
    def total(self) -> int:
        return self.projections + self.search + self.read

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def mlp_multiply_adds(form: MLPForm) -> int:
    """Multiply-adds per token of an MLP of ``form``: ``3·C·U`` gated (SwiGLU), else ``2·C·U``."""
    return (3 if form.gated else 2) * form.d_model * form.units


def search_multiply_adds(layer: MemoryLayer, entries: int) -> tuple[int, bool]:
    """``(multiply-adds, estimated)`` of one head query's top-k search in ``layer``'s store holding
    ``entries`` live entries."""
    cfg, key_dim = layer.cfg, layer.key_dim
    k = min(cfg.topk, entries)
    backend = layer.store.index_backend
    if backend == "exact":
        cost = entries * key_dim
    elif backend == "product":
        cost = math.isqrt(layer.store.capacity) * key_dim  # 2n sub-keys of Dk/2
    elif backend == "hnsw":
        ef_search = cfg.index.get("ef_search")
        ef = derived_ef(k, entries) if ef_search is None else max(int(ef_search), k)
        cost = ef * int(cfg.index.get("M", HNSW_DEFAULT_M)) * key_dim if k else 0
    elif backend in ("faiss", "scann"):
        # Exact until trained; then the partition centres, and the keys of the visited partitions (entries
        # / partitions each on average): faiss compares them whole, scann by 4-bit codes (one lookup-add a
        # dimension) and re-ranks max(128, 4·k) of them exactly.
        state = layer.store.index_state
        if not state["trained"]:
            cost = entries * key_dim
        else:
            names = ("nlist", "nprobe") if backend == "faiss" else ("leaves", "leaves_to_search")
            partitions, breadth = state[names[0]], state[names[1]] or 1
            scanned = min(entries, math.ceil(entries * breadth / partitions))
            reordered = max(MIN_REORDER, REORDER_PER_K * k) if backend == "scann" else 0
            cost = (partitions + scanned + reordered) * key_dim if k else 0
    else:
        raise ValueError(f"swap.index.backend: no multiply-add count for the {backend!r} index")
    by_magnitude = cfg.ranking == "magnitude"
    searches = index_class(backend).magnitude_searches if by_magnitude else 1
    return searches * cost, backend in ("hnsw", "faiss", "scann")


def memory_multiply_adds(layer: MemoryLayer, entries: int) -> MultiplyAdds:
    """Multiply-adds per token of a featural or associative ``layer`` over ``entries`` live entries."""
    cfg, heads, d_model = layer.cfg, layer.heads, layer.d_model
    key_dim, value_dim, gate_dim = layer.key_dim, layer.value_dim, cfg.gate_width
    k = min(cfg.topk, entries)
    projections = 0
    if cfg.dense:
        projections = d_model * heads * (key_dim + value_dim + gate_dim)  # query, output, gate query
        if isinstance(layer, AssociativeMemory):
            projections += d_model * heads * (key_dim + value_dim)  # key, value
    if isinstance(layer, AssociativeMemory) and layer.mlp is not None:
        # The kept MLP (keep_mlp): one multiply-add per weight of its matrices.
        projections += sum(p.numel() for p in layer.mlp.parameters() if p.ndim == 2)
    search, estimated = search_multiply_adds(layer, entries)
    read = k * (key_dim + gate_dim + value_dim)  # distances, gate dots, value mix
    return MultiplyAdds(projections, heads * search, heads * read, estimated)


def layer_multiply_adds(layer: nn.Module, store_entries: int | None = None) -> MultiplyAdds:
    """Multiply-adds per token of a layer swapped in for an MLP (memory layer or baseline).

    A memory layer's search and read depend on its store's live entries: ``store_entries``, or by
    default the store's count now.
    """
    if isinstance(layer, RemovedMLP):
        return MultiplyAdds()
    if isinstance(layer, LowRankMLP):
        d_model = layer.keys.in_features
        return MultiplyAdds(projections=(3 if layer.gate_keys is not None else 2) * d_model * layer.width)
    if isinstance(layer, (FeaturalMemory, AssociativeMemory)):
        entries = len(layer.store) if store_entries is None else store_entries
        return memory_multiply_adds(layer, entries)
    raise TypeError(f"no multiply-add count for a {type(layer).__name__}: not a layer swapped in for an MLP")


def swap_arithmetic(layers: Mapping[int, nn.Module], mlp: MLPForm) -> dict[str, Any]:
    """Per block and in total, the swapped ``layers``' multiply-adds per token beside their MLPs' (every
    block's MLP has the form ``mlp``), JSON-ready.

    Returns ``{"blocks": {"<index>": {"type", "projections", "search", "read", "search_estimated",
    "total", "mlp", "mlp_fraction"}}, "total", "mlp", "mlp_fraction", "search_estimated"}`` where
    ``mlp_fraction`` is the layers' total over the MLPs' (``None`` without swapped layers).
    """
    per_mlp = mlp_multiply_adds(mlp)
    blocks = {}
    for index, layer in sorted(layers.items()):
        counts = layer_multiply_adds(layer)
        blocks[str(index)] = {
            "type": layer.cfg.type,
            **counts.to_dict(),
            "mlp": per_mlp,
            "mlp_fraction": counts.total / per_mlp,
        }
    total = sum(block["total"] for block in blocks.values())
    mlp_total = per_mlp * len(blocks)
    return {
        "blocks": blocks,
        "total": total,
        "mlp": mlp_total,
        "mlp_fraction": total / mlp_total if mlp_total else None,
        "search_estimated": any(block["search_estimated"] for block in blocks.values()),
    }
