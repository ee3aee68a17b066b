"""Exact k-nearest search in torch: one matmul and a top-k per block of queries, recall 1 by construction.

The searched table holds one row per stored vector, ``[-scale · v | offset]``: each query gets a trailing
1, so the matmul forms ``offset - scale · q·v`` directly and no second pass adds the offsets to the
``(block, rows)`` result (for small widths that pass costs as much as the matmul). ``offset`` is ``1``
(ip, cosine) or ``||v||²`` (l2, with ``scale = 2``) for live rows and ``+inf`` for free ones, so free rows
are never returned while ``k`` does not exceed the live count; l2 adds ``||q||²`` after the top-k (it does
not change the order). Distances follow the conventions of :mod:`dmt.memory.metrics`: ``1 - q·v`` (ip),
``1 - cos`` (cosine, vectors normalised) and ``||q - v||²`` (l2).

:class:`dmt.memory.exact.ExactIndex` keeps such a table up to date as a store changes; an exported
student (:mod:`dmt.kernel.read`) builds one from a saved store's live keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Distances per block of queries, (block, rows): small enough that the top-k reads them while they are
# still in cache.
MAX_BLOCK_ELEMENTS = 2**22


def table_scale(metric: str) -> float:
    """``scale`` of a table's rows: 2 for l2 (``||q - v||² = ||q||² + ||v||² - 2 q·v``), else 1; a power of
    two, so ``v`` is recovered from a row exactly."""
    return 2.0 if metric == "l2" else 1.0


def row_offsets(vectors: torch.Tensor, metric: str) -> torch.Tensor:
    """``(M,)`` offsets of live table rows for ``vectors (M, D)`` (normalised already for cosine)."""
    return vectors.pow(2).sum(1) if metric == "l2" else vectors.new_ones(len(vectors))


def table_rows(vectors: torch.Tensor, metric: str) -> torch.Tensor:
    """``(M, D + 1)`` live table rows ``[-scale · v | offset]`` of ``vectors (M, D)``, normalised first for
    cosine (as hnswlib stores them)."""
    if metric == "cosine":
        vectors = F.normalize(vectors, dim=1)
    return torch.cat([-table_scale(metric) * vectors, row_offsets(vectors, metric)[:, None]], 1)


def search_table(
    queries: torch.Tensor,
    table: torch.Tensor,
    k: int,
    live: int,
    metric: str,
    by_magnitude: bool = False,
    block_elements: int = MAX_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids ``(N, k)`` int64 and distances ``(N, k)`` of the nearest live rows of ``table (R, D + 1)``
    to ``queries (N, D)``, nearest first; ``-1`` and ``+inf`` pad past the ``live`` rows' count.

    ``by_magnitude`` ranks by ``|q·v|`` (ip, cosine) instead: it reads ``|1 - distance|`` off the same
    matmul, free rows masked, in one pass rather than a search for ``q`` and one for ``-q``.
    """
    labels = torch.full((len(queries), k), -1, dtype=torch.int64, device=table.device)
    distances = torch.full((len(queries), k), float("inf"), device=table.device)
    k_live = min(k, live)
    if k_live == 0 or len(queries) == 0:
        return labels, distances
    if metric == "cosine":
        queries = F.normalize(queries, dim=1)
    dim = table.shape[1] - 1
    augmented = torch.cat([queries, queries.new_ones(len(queries), 1)], dim=1)  # (N, D + 1)
    free = table[:, dim].isinf() if by_magnitude else None  # (R,)
    block = max(1, block_elements // len(table))
    for begin in range(0, len(queries), block):
        all_distances = augmented[begin : begin + block] @ table.T  # (b, R)
        if free is not None:
            # |s| = |1 - distance| of live rows; free rows (distance +inf) rank below every live one.
            magnitude = (1.0 - all_distances).abs_().masked_fill_(free, -1.0)
            top = magnitude.topk(k_live, dim=1, sorted=True)
            found = all_distances.gather(1, top.indices)
        else:
            top = all_distances.topk(k_live, dim=1, largest=False, sorted=True)
            found = top.values
        if metric == "l2":
            squared_norms = queries[begin : begin + block].pow(2).sum(1, keepdim=True)
            found = (found + squared_norms).clamp_min(0.0)
        labels[begin : begin + block, :k_live] = top.indices
        distances[begin : begin + block, :k_live] = found
    return labels, distances
