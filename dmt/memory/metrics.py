"""Distance metrics of the stores, in hnswlib's conventions (``dmt.layers.base.neighbour_distances``
recomputes them in torch, differentiably, so they equal what the index reported for each pair):

- ``l2``: squared Euclidean distance ``||q - k||²``
- ``ip``: ``1 - q·k``
- ``cosine``: ``1 - cos(q, k)``
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Metric = Literal["l2", "ip", "cosine"]
METRICS: tuple[str, ...] = ("l2", "ip", "cosine")


def check_metric(metric: str) -> Metric:
    """Return ``metric`` if it is known, else raise a ``ValueError`` naming the choices."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric  # type: ignore[return-value]


def pairwise_distance_np(queries: np.ndarray, keys: np.ndarray, metric: Metric) -> np.ndarray:
    """Exact all-pairs distances ``(N, M)`` between ``queries (N, D)`` and ``keys (M, D)``."""
    if metric == "l2":
        return ((queries**2).sum(1, keepdims=True) - 2.0 * queries @ keys.T + (keys**2).sum(1)[None, :]).clip(
            min=0.0
        )
    if metric == "ip":
        return 1.0 - queries @ keys.T
    if metric == "cosine":
        qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        kn = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ kn.T
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
