"""The statistics record of the memory stores, plus the shared input validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import DTypeLike


@dataclass
class MemoryStats:
    """Cumulative counters of a store (logged to TensorBoard); ``entries`` is the current size.

    ``queries`` counts searched queries, ``reads`` the references to live entries reported with
    ``KNNStore.reference`` (each returned entry a caller used, duplicates included).
    """

    entries: int = 0
    inserts: int = 0
    evictions: int = 0
    queries: int = 0
    merges: int = 0
    reads: int = 0


def as_float_matrix(name: str, array: np.ndarray, dim: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Validate ``array`` as ``(N, dim)`` finite floats and return it C-contiguous in ``dtype``.

    Raises:
        ValueError: naming ``name`` when the shape, the dtype kind or a value (NaN/inf, also after the
            cast, e.g. float16 overflow) is wrong.
    """
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got {array.shape}")
    if array.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # overflow shows up as inf and is reported below
        array = np.ascontiguousarray(array, dtype=dtype)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf (after conversion to {np.dtype(dtype).name})")
    return array


def check_ids(ids: np.ndarray, capacity: int) -> np.ndarray:
    """``ids`` (slot ids, -1 for none) as flat int64.

    Raises:
        ValueError: unless they are integers in ``[-1, capacity)``.
    """
    ids = np.asarray(ids)
    # Casting floats or bools would silently turn 1.7 into slot 1 and True into slot 1.
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
    ids = ids.astype(np.int64).ravel()
    if ids.size and (ids.min() < -1 or ids.max() >= capacity):
        raise ValueError(f"ids must lie in [-1, {capacity}), got [{ids.min()}, {ids.max()}]")
    return ids


def check_k(k: int, capacity: int, metric: str, by_magnitude: bool) -> None:
    """``ValueError`` unless ``k`` is an integer in ``[1, capacity]`` and a ranking ``by_magnitude`` (by
    ``|similarity|``) fits the ``metric``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > capacity:
        raise ValueError(f"k must be an integer in [1, capacity={capacity}], got k={k!r}")
    if by_magnitude and metric == "l2":
        raise ValueError("by_magnitude ranks by |similarity|: needs an ip or cosine store, not l2")


def check_query_tensor(queries: torch.Tensor, dim: int) -> None:
    """``ValueError`` unless ``queries`` is a floating-point tensor of shape ``(N, dim)``."""
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (N, {dim}), got {tuple(queries.shape)}")
    if not queries.is_floating_point():
        raise ValueError(f"queries must be a floating-point tensor, got dtype {queries.dtype}")
