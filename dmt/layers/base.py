"""What featural and associative memory layers share: projections, the store, search and weighting.

Both layers are drop-in replacements for a transformer MLP: ``(B, T, C) -> (B, T, C)``. Queries of all
heads of all tokens are searched in one batched call against the layer's single store (heads share the
store, like product-key memories), so the store sees ``B·T·H`` queries per step.

Cold start: an empty store returns no neighbours; a query without neighbours contributes a zero vector,
so a layer with an empty store outputs ``out_proj.bias`` — the block behaves as if its MLP were removed
until inserts fill the store.

Devices: a layer keeps its store's searchable state on its own device (``.to()``, ``.cuda()``, Lightning's
placement, and a store swapped in later at its first search). An exact or product store there is searched
and read without copying queries, keys or values through the host; the bookkeeping (LRFU references, read
counts, the write log) reads the ids on the host, copied there once per search. An hnsw store stays on the
host: its queries go there once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dmt.kernel.ops import read_projections, similarity_scores
from dmt.layers.config import MemoryConfig
from dmt.layers.mlp import FFNWeights
from dmt.layers.protocol import NewEntries, current, record
from dmt.layers.seeding import seed_from_ffn
from dmt.memory import KNNStore, token_spans


@dataclass
class ReadCounts:
    """What a layer's training searches returned since they were last taken (for per-step rates)."""

    searches: int = 0
    reads: int = 0  # valid neighbours returned
    distinct: int = 0  # distinct entries returned, summed over searches
    new: int = 0  # reads of entries inserted since ``MemoryLayer.start_run``
    distance_sum: float = 0.0  # of the reads to their queries


# Queries a layer keeps from its latest training search, to measure the index's recall on them.
RECALL_SAMPLE = 64


@dataclass
class Retrieved:
    """A search result moved to torch, with ``N = B·T·H`` queries, ``K = topk`` and ``U`` distinct entries.

    Neighbours are not gathered per query: ``rows`` says which row of the tables ``keys``, ``entries`` each
    neighbour is, so ``(N, K, D)`` tensors are only built where a computation needs them. A training
    forward copies each distinct entry out of the store once (its entries are a leaf that gradients reach,
    ``slots`` says where each came from); a forward that only reads indexes the store's own tables in
    place (``slots`` None, row = slot, entries in the store's value dtype).
    """

    ids: np.ndarray  # (N, K) int64 store slots, -1 where no entry
    distances: np.ndarray  # (N, K) float32 as the index reported them, +inf where no entry
    valid: torch.Tensor  # (N, K) bool
    searched: torch.Tensor  # (N, K) float32 the distances on the queries' device, 0 where no entry
    rows: torch.Tensor  # (N, K) int64 row of each neighbour in `keys` / `entries` (0 where no entry)
    slots: np.ndarray | None  # (U,) store slot of each copied row, -1 for the all-zero padding row
    keys: torch.Tensor  # (U, Dk)
    entries: torch.Tensor  # (U, E): value, then (gated featural memory) gate key

    def first(self, k: int) -> Retrieved:
        """The ``k`` nearest of each query's neighbours (a search sorted nearest first); the tables stay."""
        if self.ids.shape[1] <= k:
            return self
        return Retrieved(
            self.ids[:, :k],
            self.distances[:, :k],
            self.valid[:, :k],
            self.searched[:, :k],
            self.rows[:, :k],
            self.slots,
            self.keys,
            self.entries,
        )

    @property
    def nearest(self) -> np.ndarray:
        """``(N,)`` distance of each query's nearest returned entry, +inf if none (the first, unless the
        search ranked by ``|similarity|``)."""
        return self.distances.min(axis=1)


class MemoryLayer(nn.Module):
    """Base class: owns the store, the query and output projections, and per-layer statistics."""

    def __init__(self, d_model: int, cfg: MemoryConfig, store: KNNStore | None = None) -> None:
        """``cfg`` resolved (every setting derived, see :meth:`MemoryConfig.resolved`)."""
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.heads = cfg.heads
        self.key_dim = cfg.key_dim
        self.value_dim = cfg.value_dim
        # What a store entry holds besides its key: the value, then (gated featural memory) the gate key.
        self.entry_dim = self.value_dim + cfg.gate_width
        self.store = self.checked_store(store or self.empty_store())
        # Without dense weights the config checked that queries and values are d_model (+ 1) wide. The gate
        # query (gate_dim > 0) is dotted with each returned entry's gate key.
        self.query_proj, self.out_proj, self.gate_query_proj = read_projections(
            d_model, self.heads, self.key_dim, self.value_dim, cfg.gate_width, cfg.dense
        )
        self.last_topk_distance = float("nan")
        # (store slots (U,), returned entries (U, E) with .grad after backward) of the training forwards
        # since the last apply_value_updates.
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        # The store clock when the run started (start_run): entries inserted after it are the run's own.
        # None: reads are not told apart.
        self._run_start: int | None = None
        self._reads = ReadCounts()
        self._recall_queries = torch.zeros(0, self.key_dim)  # (≤ RECALL_SAMPLE, Dk) float32
        self._recall_by_magnitude = False

    def empty_store(self, capacity: int | None = None, index: Mapping[str, Any] | None = None) -> KNNStore:
        """A new, empty store of this layer's settings (of ``capacity`` entries and on the key ``index``
        settings, when given, instead of the layer's)."""
        cfg = self.cfg
        return KNNStore(
            key_dim=self.key_dim,
            value_dim=self.entry_dim,
            capacity=cfg.capacity if capacity is None else capacity,
            metric=cfg.metric,
            lrfu_lambda=cfg.lrfu_lambda,
            value_dtype=cfg.value_dtype,
            index=dict(cfg.index if index is None else index),
            eviction=cfg.eviction,
        )

    def checked_store(self, store: KNNStore) -> KNNStore:
        """``store``, whose widths must be this layer's key and entry widths."""
        if (store.key_dim, store.value_dim) != (self.key_dim, self.entry_dim):
            raise ValueError(
                f"store dims (key {store.key_dim}, value {store.value_dim}) do not match the layer's "
                f"(key {self.key_dim}, value {self.entry_dim})"
            )
        return store

    def use_store(self, store: KNNStore) -> None:
        """Search and write ``store`` from now on (an emptied memory, a memory pack's entries), on the
        layer's device."""
        self.store = self.checked_store(store)
        if self.out_proj.bias.device.type != "meta":
            store.to(self.out_proj.bias.device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) → (B, T, C)``: :meth:`read_write` in the layer's own dtype, outside any autocast.

        Scores, top-k and the stores' keys and values stay float32 under mixed precision: bfloat16 scores
        reorder close neighbours, and CUDA's ``embedding_bag`` refuses bfloat16 weights over a float32
        table. The output takes the input's dtype.
        """
        with torch.autocast(hidden_states.device.type, enabled=False):
            output = self.read_write(hidden_states.to(self.out_proj.bias.dtype))
        return output.to(hidden_states.dtype)

    def read_write(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The layer's search, read and inserts, ``(B, T, C) → (B, T, C)``."""
        raise NotImplementedError

    def init_from_ffn(self, ffn: FFNWeights) -> None:
        """Seed the store and projections from the MLP this layer replaces (:func:`seed_from_ffn`)."""
        seed_from_ffn(self, ffn)

    def gate_queries(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Gate queries ``(N, G)`` of ``hidden_states (B, T, C)``; ``None`` for ungated entries."""
        if self.gate_query_proj is None:
            return None
        return self.split_heads(self.gate_query_proj(hidden_states), self.cfg.gate_width)  # (N, G)

    def write(self, op: str, *args: Any) -> None:
        """Mutate the store, now or when the caller commits (:func:`dmt.layers.protocol.record`)."""
        record(self, self.store, op, args)

    @property
    def inserting(self) -> bool:
        """Whether this forward inserts novel entries: in training, or in evaluation when the settings
        (``insert_during_eval``) or the caller (:meth:`MemoryProtocol.forward`, ``insert``) say so."""
        if self.cfg.novelty_threshold is None:
            return False
        return self.training or self.cfg.insert_during_eval or current().insert

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MemoryLayer:
        """Move the parameters (``nn.Module``), then the store after them: it is not a parameter or buffer
        (it lives outside the state dict), so ``.to()`` alone would leave it behind."""
        super()._apply(fn, recurse)
        device = self.out_proj.bias.device
        # Meta parameters are a model built empty, its weights loaded later (dmt.model.persistence): the
        # store already holds its data and stays where it is.
        if device.type != "meta":
            self.store.to(device)
        return self

    @property
    def searched_k(self) -> int:
        """Neighbours a forward asks the store for: ``topk``."""
        return self.cfg.topk

    def search(self, queries: torch.Tensor, by_magnitude: bool = False, k: int | None = None) -> Retrieved:
        """Batched top-k search for ``queries (N, Dk)`` (by ``|similarity|`` with ``by_magnitude``; ``k``
        neighbours, default ``topk``); tensors on the queries' device and dtype.

        The store is first put on the queries' device (nothing to do once it is there). On that device the
        search, and the gathering of the returned keys and entries, copy nothing to the host but the ids
        and distances, in :func:`host_results` (one device→host copy); an hnsw store is searched on the
        host from one copy of the queries.

        Raises:
            ValueError: a query holds NaN or inf (its neighbours' distances are not finite).
        """
        detached = queries.detach().float()  # (N, Dk)
        k = self.cfg.topk if k is None else k
        self.store.to(queries.device)
        if self.store.device == queries.device:
            device_ids, device_distances = self.store.search_torch(detached, k, by_magnitude)  # (N, K)
            ids, distances = host_results(device_ids, device_distances)
            searched = device_distances.masked_fill(device_ids < 0, 0.0)  # stays on the device
        else:
            ids, distances = self.store.search(detached.cpu().numpy(), k, by_magnitude)
            searched = torch.from_numpy(np.where(ids >= 0, distances, np.float32(0))).to(queries.device)
        found = ids >= 0
        found_distances = distances[found]
        if not np.isfinite(found_distances).all():
            raise ValueError(f"{self.cfg.type} memory search: queries contain NaN or inf")
        self.write("reference", ids)  # LRFU: each query referenced every entry it returned
        if found.any():
            self.last_topk_distance = float(found_distances.mean())
        valid = torch.from_numpy(found).to(queries.device)
        if self.training:
            self._count_reads(ids[found], found_distances)
            stride = max(1, len(detached) // RECALL_SAMPLE)
            self._recall_queries = detached[::stride][:RECALL_SAMPLE].clone()  # not a view of the batch
            self._recall_by_magnitude = by_magnitude
        if self.store.has_tables and not (self.training and torch.is_grad_enabled()):
            # Reading only: the neighbours are read where they lie; padding reads row 0 at weight 0.
            keys, entries = self.store.tables()  # (R, Dk), (R, E) on the store's device
            rows = torch.from_numpy(np.where(found, ids, 0))
            return Retrieved(ids, distances, valid, searched, rows.to(keys.device), None, keys, entries)
        slots, rows = np.unique(ids, return_inverse=True)  # sorted: a padding id -1 becomes row 0
        keys, entries = self.store.get_tensors(slots[slots >= 0])  # (U', Dk), (U', E) on the store's device
        if len(slots) and slots[0] < 0:
            keys = torch.cat([keys.new_zeros(1, self.key_dim), keys])
            entries = torch.cat([entries.new_zeros(1, self.entry_dim), entries])
        return Retrieved(
            ids=ids,
            distances=distances,
            valid=valid,
            searched=searched,
            rows=torch.from_numpy(rows.reshape(ids.shape)).to(queries.device),
            slots=slots,
            keys=keys.to(device=queries.device, dtype=queries.dtype),
            entries=entries.to(device=queries.device, dtype=queries.dtype),
        )

    def learnable_entries(self, found: Retrieved) -> torch.Tensor:
        """``found.entries (U, E)``; in a training forward, a leaf whose gradient (dValueReturned)
        :meth:`apply_value_updates` writes back into the store."""
        entries = found.entries
        if self.training and torch.is_grad_enabled():
            entries.requires_grad_(True)
            self._pending.append((found.slots, entries))
        return entries

    @torch.no_grad()
    def apply_value_updates(self, lr: float | None = None) -> None:
        """SGD step (rate ``lr``, default ``value_lr``) on the stored entries that the pending forwards
        returned, then forget them."""
        lr = self.cfg.value_lr if lr is None else lr
        for slots, entries in self._pending:
            if entries.grad is None:
                continue
            grads = entries.grad  # (U, E), one row per distinct entry
            if len(slots) and slots[0] < 0:  # the padding row (sorted first) is not an entry
                slots, grads = slots[1:], grads[1:]
            self.write("update", slots, grads.float().cpu().mul_(-lr).numpy())
        self._pending.clear()

    def insert_novel(self, nearest: np.ndarray, keys: torch.Tensor, values: torch.Tensor | None) -> None:
        """Insert the rows of ``keys (N, Dk)`` / ``values (N, Dv)`` whose nearest neighbour is far enough.

        ``values=None`` inserts zero values (featural layers learn them afterwards). When the caller gave
        the forward's input ids ``(B, T)`` (:func:`~dmt.layers.protocol.current`), row ``n`` of the
        ``N = B·T·H`` rows comes from token ``(b, t) = divmod(n // H, T)`` and its entry records the ids of
        the tokens up to ``t`` as its origin (``KNNStore.insert``). Inside
        :meth:`~dmt.layers.protocol.MemoryProtocol.collecting` the rows are handed to the caller instead.
        """
        if not self.inserting:
            return
        novel = nearest > self.cfg.novelty_threshold  # +inf (no neighbour) is always novel
        if novel.any():
            mask = torch.from_numpy(novel).to(keys.device)
            new_keys = keys.detach()[mask].float().cpu().numpy()  # (M, Dk)
            new_values = (
                np.zeros((len(new_keys), self.entry_dim), dtype=np.float32)
                if values is None
                else values.detach()[mask].float().cpu().numpy()
            )  # (M, Dv)
            collect = current().collect
            if collect is not None and self in collect:
                collect[self].append(NewEntries(np.flatnonzero(novel), new_keys, new_values))
                return
            origin_tokens = next_tokens = None
            if current().token_ids is not None:
                token_ids = current().token_ids.detach().cpu().numpy()  # (B, T)
                if token_ids.size * self.heads != len(novel):
                    raise ValueError(
                        f"token_ids of shape {tuple(token_ids.shape)} do not match the {len(novel)} query "
                        f"rows of {self.heads} head(s)"
                    )
                batch, position = np.divmod(np.flatnonzero(novel) // self.heads, token_ids.shape[1])
                origin_tokens = token_spans(token_ids, batch, position)  # (M, ORIGIN_SPAN)
                following = np.minimum(position + 1, token_ids.shape[1] - 1)
                next_tokens = np.where(
                    position + 1 < token_ids.shape[1], token_ids[batch, following], -1
                )  # (M,)
            self.write("insert", new_keys, new_values, None, origin_tokens, next_tokens)

    def maybe_recombine(self, found: Retrieved) -> None:
        if self.training and self.cfg.recombine_distance is not None:
            self.write("recombine", found.ids, found.distances, self.cfg.recombine_distance)

    def scores(self, distances: torch.Tensor) -> torch.Tensor:
        """Similarity ``(N, K)`` from the neighbours' ``distances (N, K)``, scaled by the temperature."""
        return similarity_scores(distances, self.cfg.metric, self.cfg.temperature)

    def split_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``(B, T, H·dim) -> (B·T·H, dim)``"""
        return x.reshape(-1, dim)

    def merge_heads(self, x: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
        """``(B·T·H, Dv) -> (B, T, H·Dv)`` then the output projection to ``(B, T, C)``."""
        return self.out_proj(x.reshape(*batch_shape, self.heads * self.value_dim))

    def _count_reads(self, read_ids: np.ndarray, read_distances: np.ndarray) -> None:
        """Count a training search's valid neighbours ``read_ids (M,)`` at ``read_distances (M,)`` and its
        distinct entries."""
        self._reads.searches += 1
        self._reads.reads += len(read_ids)
        self._reads.distinct += len(np.unique(read_ids))
        self._reads.distance_sum += float(read_distances.sum(dtype=np.float64))
        if self._run_start is not None and len(read_ids):
            self._reads.new += int(np.count_nonzero(self.store.insertion_times(read_ids) > self._run_start))

    def start_run(self, clock: int | None = None) -> None:
        """Count reads of entries inserted after store clock ``clock`` (default: now) as the run's own
        (``ReadCounts.new``); the training loop calls it as a run starts or resumes."""
        self._run_start = self.store.now if clock is None else clock

    def take_read_counts(self) -> ReadCounts:
        """The training searches' read counts since the last call; the counts restart from zero."""
        counts, self._reads = self._reads, ReadCounts()
        return counts

    def search_sample(self) -> tuple[np.ndarray, bool]:
        """Up to :data:`RECALL_SAMPLE` queries ``(n, Dk)`` of the latest training search, on the host, and
        whether that search ranked by magnitude (``n = 0`` before any)."""
        return self._recall_queries.cpu().numpy(), self._recall_by_magnitude

    def sample_recall(self) -> float:
        """The index's recall@k against exact search on a sample of the latest training search's queries
        (NaN before any); the store is left unchanged."""
        queries, by_magnitude = self.search_sample()  # (≤ RECALL_SAMPLE, Dk)
        if not len(queries):
            return float("nan")
        return self.store.recall(queries, self.cfg.topk, by_magnitude=by_magnitude)

    def memory_stats(self) -> dict[str, float]:
        """Cumulative counters of the store, its size and the latest mean top-k distance."""
        stats = self.store.stats
        return {
            "entries": float(len(self.store)),
            "inserts": float(stats.inserts),
            "evictions": float(stats.evictions),
            "merges": float(stats.merges),
            "mean_topk_distance": self.last_topk_distance,
        }

    def extra_repr(self) -> str:
        return (
            f"type={self.cfg.type}, heads={self.heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"topk={self.cfg.topk}, metric={self.cfg.metric}, capacity={self.cfg.capacity}"
        )


def host_results(ids: torch.Tensor, distances: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``ids (N, K)`` int64 and ``distances (N, K)`` float32 as numpy on the host, in one device→host copy:
    both travel as float64, exact for ids below 2**53 and for every float32 (no copy for host tensors)."""
    if ids.device.type == "cpu":
        return ids.numpy(), distances.numpy()
    packed = torch.stack([ids.double(), distances.double()]).cpu().numpy()  # (2, N, K)
    return packed[0].astype(np.int64), packed[1].astype(np.float32)
