"""The protocol between whoever runs a model (training, evaluation, a benchmark) and its memory layers.

A memory layer changes its store as it reads (LRFU references, inserts, recombination) and after backward
(the write-back of returned values). The caller decides when those writes land: at once (evaluation,
reading a document), or recorded and committed after the optimiser step, identically on every
data-parallel replica (training), so that weights and memory advance together. A forward may also need
more than hidden states: the input ids (entries record the text they came from; ``next_token`` values),
the teacher MLPs' outputs (``inserted_values: mlp_output``) and the model's input embeddings.

One :class:`MemoryProtocol` per model carries all of it. Its :meth:`~MemoryProtocol.forward` context puts
a :class:`ForwardContext` in place for the forward inside it; the layers read it with :func:`current`
and write through :func:`record`. Nothing outside a layer sets an attribute of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dmt.memory import KNNStore

if TYPE_CHECKING:
    from dmt.layers.base import MemoryLayer

# A store mutation recorded by a layer: (operation, arguments of the store method).
WriteOp = tuple[str, tuple[Any, ...]]
# Store method of each operation, in the order a commit applies them: references and value updates name
# ids from the step's searches, so they go before recombination and inserts can free or reuse slots.
WRITE_METHODS: dict[str, str] = {
    "reference": "reference",
    "update": "update_values",
    "recombine": "recombine",
    "insert": "insert",
}


def apply_writes(store: KNNStore, writes_per_rank: list[list[WriteOp]]) -> None:
    """Apply the recorded writes of every rank to ``store``: operation by operation (see
    ``WRITE_METHODS``), rank by rank. Every replica applying the same lists ends with the same store."""
    for op, method in WRITE_METHODS.items():
        for writes in writes_per_rank:
            for name, args in writes:
                if name == op:
                    getattr(store, method)(*args)


@dataclass(frozen=True)
class NewEntries:
    """What one forward of a layer would insert, handed to the caller instead (memorising a corpus)."""

    rows: np.ndarray  # (M,) int64 query rows judged novel, of the N = B·T·H rows: token divmod(row // H, T)
    keys: np.ndarray  # (M, Dk) float32
    values: np.ndarray  # (M, E) float32: value, then (gated layers) gate key


@dataclass(frozen=True)
class ForwardContext:
    """What the memory layers of the forward in progress are told (empty outside any protocol)."""

    token_ids: torch.Tensor | None = None  # (B, T) input ids; None: origins are not recorded
    insert_targets: Mapping[nn.Module, torch.Tensor] = field(default_factory=dict)  # layer → (B, T, C)
    token_embeddings: nn.Module | None = None  # the model's input embeddings (next_token values)
    insert: bool = False  # layers that insert in training insert in evaluation too
    log: Mapping[nn.Module, list[WriteOp]] | None = None  # layer → its deferred writes; None: at once
    collect: Mapping[nn.Module, list[NewEntries]] | None = None  # layer → what it would insert (not stored)


OUTSIDE = ForwardContext()  # no caller said anything: writes apply at once, nothing is handed over
_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("dmt_memory_forward", default=None)


def current() -> ForwardContext:
    """The context of the forward in progress (:data:`OUTSIDE` outside any :meth:`MemoryProtocol.forward`)."""
    return _CONTEXT.get() or OUTSIDE


def record(layer: nn.Module, store: KNNStore, op: str, args: tuple[Any, ...]) -> None:
    """A write of ``layer`` to its ``store``: recorded when the context defers this layer's writes,
    applied at once otherwise."""
    log = current().log
    if log is not None and layer in log:
        log[layer].append((op, args))
    else:
        apply_writes(store, [[(op, args)]])


class MemoryProtocol:
    """The memory layers of one model, and how the code that runs the model talks to them.

    Args:
        layers: the model's memory layers by block index (``dmt.model.surgery.memory_layers``).
        token_embeddings: the model's input embeddings, which ``inserted_values: next_token`` stores.
        deferred: record the layers' writes for :meth:`commit` instead of applying them at once.
    """

    def __init__(
        self,
        layers: Mapping[int, MemoryLayer],
        token_embeddings: nn.Module | None = None,
        deferred: bool = False,
    ) -> None:
        self.layers = dict(layers)
        self.token_embeddings = token_embeddings
        self.deferred = deferred
        self._log: dict[nn.Module, list[WriteOp]] = {layer: [] for layer in self.layers.values()}

    @contextmanager
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        insert_targets: Mapping[int, torch.Tensor] | None = None,
        insert: bool = False,
    ) -> Iterator[None]:
        """The context of the forward(s) inside the block.

        Args:
            input_ids: ``(B, T)`` of the forward, recorded as the origin of what it inserts.
            insert_targets: by block index, the teacher MLP's output ``(B, T, C)`` that an associative
                layer with ``inserted_values: mlp_output`` inserts.
            insert: layers that insert in training (``novelty_threshold`` set) insert in evaluation too.
        """
        targets = {self.layers[i]: target for i, target in (insert_targets or {}).items() if i in self.layers}
        context = ForwardContext(
            token_ids=input_ids,
            insert_targets=targets,
            token_embeddings=self.token_embeddings,
            insert=insert,
            log=self._log if self.deferred else None,
        )
        token = _CONTEXT.set(context)
        try:
            yield
        finally:
            _CONTEXT.reset(token)

    @contextmanager
    def collecting(self, input_ids: torch.Tensor) -> Iterator[dict[int, list[NewEntries]]]:
        """The forward(s) inside the block hand what each inserting layer would store to the caller, by
        block index, instead of storing it; the layers insert as in training (``novelty_threshold``).

        Only a deferred protocol is accepted, so that nothing else the forward writes (LRFU references)
        lands either: the caller drops it with :meth:`take_writes`, and the stores stay as they were.
        """
        if not self.deferred:
            raise RuntimeError("collecting needs a deferred protocol (memory_protocol(model, deferred=True))")
        found: dict[nn.Module, list[NewEntries]] = {layer: [] for layer in self.layers.values()}
        with self.forward(input_ids, insert=True):
            token = _CONTEXT.set(replace(_CONTEXT.get(), collect=found))
            try:
                yield {index: found[layer] for index, layer in self.layers.items()}
            finally:
                _CONTEXT.reset(token)

    @contextmanager
    def each_forward(self, model: nn.Module, insert: bool = False) -> Iterator[None]:
        """Within the block, every forward of ``model`` runs in :meth:`forward` with its own input ids."""
        tokens: list[Any] = []

        def enter(_model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)  # (B, T), or None for embeddings
            context = self.forward(input_ids, insert=insert)
            context.__enter__()
            tokens.append(context)

        def leave(*_: Any) -> None:
            tokens.pop().__exit__(None, None, None)

        hooks = [
            model.register_forward_pre_hook(enter, with_kwargs=True),
            model.register_forward_hook(leave, always_call=True),
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def write_back_values(self, world_size: int = 1) -> None:
        """Every layer's sparse SGD step on the stored values its forwards returned since the last call,
        at ``value_lr / world_size``: all data-parallel ranks' updates are applied (:meth:`commit`), so
        dividing by their number averages them, as DDP averages dense gradients."""
        with self.forward():
            for layer in self.layers.values():
                layer.apply_value_updates(layer.cfg.value_lr / world_size)

    def take_writes(self) -> dict[int, list[WriteOp]]:
        """The writes recorded since the last call, by block index, in order; the record is emptied."""
        writes = {index: list(self._log[layer]) for index, layer in self.layers.items()}
        for pending in self._log.values():
            pending.clear()
        return writes

    def commit(self) -> None:
        """Apply the writes recorded since the last commit, the same on every replica.

        Under data parallelism each rank searched and computed value updates on its own batch; the records
        of all ranks are gathered and applied in rank order, so every replica's stores stay identical and a
        checkpoint written by rank 0 holds everyone's memory.
        """
        writes = self.take_writes()
        gathered = [writes]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, writes)
        for index, layer in self.layers.items():
            apply_writes(layer.store, [rank_writes[index] for rank_writes in gathered])
