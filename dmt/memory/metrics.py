"""Distance metrics shared by the stores (numpy, search side) and the layers (torch, gradient side).

The conventions follow hnswlib so that a distance computed in torch from a query and a returned key
equals the distance the index reported for that pair:

- ``l2``: squared Euclidean distance ``||q - k||²``
- ``ip``: ``1 - q·k``
- ``cosine``: ``1 - cos(q, k)``
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Metric = Literal["l2", "ip", "cosine"]
METRICS: tuple[str, ...] = ("l2", "ip", "cosine")


def check_metric(metric: str) -> Metric:
    """Return ``metric`` if it is known, else raise a ``ValueError`` naming the choices."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric  # type: ignore[return-value]


def distance(queries: torch.Tensor, keys: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Distance of each query to each of its own candidate keys, differentiable in both.

    Args:
        queries: ``(N, D)``
        keys: ``(N, K, D)`` — the K candidates returned for each query
    Returns:
        ``(N, K)`` distances in the index's convention.
    """
    if metric == "l2":
        return (queries.unsqueeze(1) - keys).pow(2).sum(-1)
    if metric == "ip":
        return 1.0 - torch.einsum("nd,nkd->nk", queries, keys)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(queries.unsqueeze(1), keys, dim=-1)
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


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
