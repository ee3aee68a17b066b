"""The statistics record of the memory stores, plus the shared input validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
