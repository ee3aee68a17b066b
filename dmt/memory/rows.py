"""The keys and values of a :class:`~dmt.memory.store.KNNStore`, by slot, on the host and on its device.

Keys ``(R, key_dim)`` float32 and values ``(R, value_dim)`` hold ``R`` rows, ``H <= R <= capacity`` for the
high-water mark ``H`` (highest live slot + 1): a new store allocates all ``capacity`` rows, a restored one
only the ``H`` rows it saved (kept memory-mapped on request), and the first write to a row ``>= R`` grows
both to ``capacity``. The numpy arrays are the store's record (saved, read by ``get``); a
:class:`~dmt.memory.device_mirror.DeviceMirror` follows every write on a device.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from dmt.memory.device_mirror import DeviceMirror


class Rows:
    """Keys and values of the ``capacity`` slots of a store, holding the arrays it is given (no copy)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, capacity: int) -> None:
        self.keys = keys  # (R, key_dim) float32
        self.values = values  # (R, value_dim) in the store's value dtype
        self.capacity = capacity
        self.mirror = DeviceMirror()

    def to(self, device: torch.device) -> None:
        """Copy all rows to ``device`` unless they are there already; on the host, hold no copies."""
        if device.type == "cpu":
            self.mirror.drop()
        elif not self.mirror.active or self.mirror.device != device:
            self.mirror.copy_all(self.keys, self.values, device)

    def write(self, slots: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """``keys (M, key_dim)`` and ``values (M, value_dim)`` into rows ``slots (M,)``, growing first if one
        lies beyond ``R``; the device copies follow with :meth:`sync`."""
        if slots.max() >= len(self.keys):
            self._grow()
        self.keys[slots], self.values[slots] = keys, values

    def _grow(self) -> None:
        """Give keys and values a row for every slot.

        One allocation and copy; ``np.zeros`` pages that are never written cost no memory. Memory-mapped
        rows are held in memory from then on: later writes no longer reach their files.
        """
        rows = len(self.keys)
        keys = np.zeros((self.capacity, self.keys.shape[1]), dtype=np.float32)  # (C, key_dim)
        values = np.zeros((self.capacity, self.values.shape[1]), dtype=self.values.dtype)  # (C, value_dim)
        keys[:rows], values[:rows] = self.keys, self.values
        self.keys, self.values = keys, values
        self.mirror.refresh(self.keys, self.values)

    def sync(self, slots: np.ndarray) -> None:
        """After a write on the host: copy rows ``slots (M,)`` to the device copies, if there are any."""
        self.mirror.copy_rows(slots, self.keys, self.values)

    def add_to_values(self, ids: np.ndarray, deltas: np.ndarray) -> None:
        """``values[ids] += deltas (M, value_dim)`` float32 for rows ``ids (M,)``; duplicates accumulate, and
        sums are formed in float32 before the single cast to the value dtype."""
        if self.values.dtype == np.float32:
            # In place through a shared torch view (memory-mapped values included): one multi-threaded
            # pass that also sums duplicate ids, where numpy's fancy-indexed += would drop them.
            torch.from_numpy(self.values).index_add_(0, torch.from_numpy(ids), torch.from_numpy(deltas))
            if self.mirror.active:
                self.sync(np.unique(ids))
            return
        ids, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(ids), self.values.shape[1]).index_add_(
            0, torch.from_numpy(inverse.ravel()), torch.from_numpy(deltas)
        )
        self.values[ids] = (self.values[ids].astype(np.float32) + summed.numpy()).astype(self.values.dtype)
        self.sync(ids)

    def fold(self, members: np.ndarray, weights: np.ndarray) -> None:
        """Row ``members[0]`` becomes the ``weights (m,)`` float32 mean of rows ``members (m,)``, its value
        summed in float32; the device copies follow with :meth:`sync`."""
        target = members[0]
        self.keys[target] = weights @ self.keys[members]
        self.values[target] = (weights @ self.values[members].astype(np.float32)).astype(self.values.dtype)

    def cast_values(self, value_dtype: str) -> None:
        """Values in ``value_dtype`` from now on; memory-mapped values move into memory."""
        self.values = np.asarray(self.values).astype(value_dtype)
        self.mirror.refresh(self.keys, self.values)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(R, key_dim)`` float32 and values ``(R, value_dim)`` in the value dtype, row = slot, as
        tensors on the store's device that share the store's memory (no copy): the device copies, or views
        of the host arrays."""
        if self.mirror.active:
            return self.mirror.keys, self.mirror.values
        with warnings.catch_warnings():
            # A read-only memory map gives a read-only view; torch warns, but these tensors are only read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.keys), torch.from_numpy(self.values)

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(M, key_dim)`` float32 and values ``(M, value_dim)`` float32 of rows ``ids (M,)``."""
        # Fancy indexing copies already; astype(copy=False) adds no second copy of float32 values.
        return self.keys[ids], self.values[ids].astype(np.float32, copy=False)
