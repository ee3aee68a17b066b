"""A copy of a store's keys and values on a torch device, so that reads there need no host copies.

A :class:`~dmt.memory.store.KNNStore` whose index searches on a device (:meth:`KNNStore.to
<dmt.memory.store.KNNStore.to>`: exact and product indexes) holds a :class:`DeviceMirror` of its
numpy keys and values there and updates it after every write on the host; :meth:`KNNStore.get_tensors
<dmt.memory.store.KNNStore.get_tensors>` gathers from it. The numpy arrays stay the store's record (saved,
read by ``get``): the mirror only ever follows them.
"""

from __future__ import annotations

import numpy as np
import torch


class DeviceMirror:
    """Keys ``(R, key_dim)`` and values ``(R, value_dim)`` (in the store's value dtype) of a store's ``R``
    rows on one device, or none (:attr:`active` False) while the store is on the host, where its numpy
    arrays are read directly."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether there are copies to keep in step."""
        return self.keys is not None and self.values is not None

    @property
    def device(self) -> torch.device | None:
        """Where the copies are; None without copies."""
        return None if self.keys is None else self.keys.device

    def drop(self) -> None:
        """Hold no copies any more."""
        self.keys = self.values = None

    def copy_all(self, keys: np.ndarray, values: np.ndarray, device: torch.device) -> None:
        """Copy all of ``keys`` and ``values`` to ``device`` (a move, or a change of their row count or
        dtype)."""
        self.keys = torch.from_numpy(np.asarray(keys)).to(device)
        self.values = torch.from_numpy(np.asarray(values)).to(device)

    def refresh(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Copy all of ``keys`` and ``values`` anew to the copies' device (their row count or dtype changed),
        if there are copies."""
        if self.keys is not None:
            self.copy_all(keys, values, self.keys.device)

    def copy_rows(self, slots: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """After a write on the host: copy rows ``slots (M,)`` of ``keys`` and ``values`` to the copies, if
        there are any."""
        if self.keys is None or self.values is None:
            return
        rows = torch.from_numpy(slots).to(self.keys.device)
        self.keys[rows] = torch.from_numpy(keys[slots]).to(self.keys.device)
        self.values[rows] = torch.from_numpy(values[slots]).to(self.keys.device)

    def gather(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(M, key_dim)`` and float32 values ``(M, value_dim)`` of rows ``ids (M,)``, new tensors on
        the copies' device (only ``ids`` cross from the host)."""
        if self.keys is None or self.values is None:
            raise RuntimeError("the device mirror holds no copies")
        rows = torch.from_numpy(ids).to(self.keys.device)
        return self.keys[rows], self.values[rows].float()
