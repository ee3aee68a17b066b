"""The measurements: layer vs dense MLP, a profiled layer step (:mod:`dmt.bench.profile`), index quality,
distillation, footprint."""

from __future__ import annotations

import copy
import gc
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from dmt.bench.profile import profile_step
from dmt.bench.stores import PeakRSS, StoreSpec, cached_store, directory_bytes, float16_copy, layer_config
from dmt.distill.module import DistillationModule
from dmt.layers import MemoryConfig, MemoryLayer, MemoryProtocol, build_memory_layer
from dmt.layers.arithmetic import layer_multiply_adds, mlp_multiply_adds
from dmt.memory import KNNStore
from dmt.memory.index import KeyIndex
from dmt.model.families import mlp_form
from dmt.model.surgery import attach_memory_layers, memory_layers

GPT2_WIDTH = 768


def median_seconds(step: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of ``step`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return paired_median_seconds({"step": step}, warmup, repeats)["step"]


def paired_median_seconds(steps: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each of ``steps``, run in turn within every repeat.

    Interleaving makes the compared steps share whatever else loads the machine at the time, so their
    ratio stays fair on a shared host.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def train_step(
    module: nn.Module, hidden: torch.Tensor, grad: torch.Tensor, memory: MemoryProtocol | None = None
) -> None:
    """Forward and backward of a block MLP (dense or memory) on ``hidden (B, T, C)``.

    A memory layer's backward ends by writing the returned values' gradient into its store (sparse SGD,
    through ``memory``, the layer's protocol), so that write-back is part of its step, as in training.
    """
    module.zero_grad(set_to_none=True)
    module(hidden).backward(grad)
    if memory is not None:
        memory.write_back_values()


def gpt2_mlp() -> GPT2MLP:
    """The MLP of a GPT-2 (124M) block: 768 → 3072 → 768, GELU, dropout (training mode)."""
    config = GPT2Config()
    return GPT2MLP(4 * config.n_embd, config).train()


def memory_layer(cfg: MemoryConfig, store: KNNStore) -> MemoryLayer:
    """A GPT-2-width memory layer of ``cfg`` around a prefilled ``store``, in training mode."""
    torch.manual_seed(0)
    return build_memory_layer(GPT2_WIDTH, cfg, store).train()


def layer_inputs(batch: int, seq: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of hidden states ``(B, T, 768)`` (with grad, as inside a network) and upstream
    gradients. Steps take a new batch each, as in training: a repeated batch would find its own
    previous inserts in the store and skip the insert work."""
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch, seq, GPT2_WIDTH, generator=generator).requires_grad_(True),
            torch.randn(batch, seq, GPT2_WIDTH, generator=generator),
        )
        for _ in range(count)
    ]


def feeding(module: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """A step that trains ``module`` on the next of ``inputs`` at each call (cycling)."""
    feed = itertools.cycle(inputs)
    memory = MemoryProtocol({0: module}) if isinstance(module, MemoryLayer) else None
    return lambda: train_step(module, *next(feed), memory)


def search_and_read(store: KNNStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What a query costs: the top-``k`` search of ``queries (N, key_dim)`` and a copy of the keys
    ``(M, key_dim)`` and values ``(M, value_dim)`` of its ``M`` returned entries (repeats included)."""
    ids, _ = store.search(queries, k)
    return store.get(ids[ids >= 0])


def paired_search_seconds(
    indexes: dict[str, KeyIndex], queries: torch.Tensor, k: int, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of a top-``k`` search of ``queries (N, D)`` in each of ``indexes``, interleaved."""
    return paired_median_seconds(
        {name: lambda index=index: index.search_torch(queries, k) for name, index in indexes.items()},
        warmup,
        repeats,
    )


def exact_scan(
    capacity: int, entries: int, dim: int, n_queries: int, k: int, warmup: int, repeats: int
) -> dict[str, Any]:
    """Exact search in a store of ``capacity`` holding ``entries`` keys, side by side: as a store fills
    them (the lowest slots, so the index scans ``entries`` rows) and with one more key in the top slot
    (the scan then covers every slot up to capacity: what tracking the live rows saves)."""
    from dmt.memory.exact import ExactIndex

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((entries, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    indexes: dict[str, KeyIndex] = {
        "live_rows": ExactIndex(dim, "ip", capacity),
        "all_rows": ExactIndex(dim, "ip", capacity),
    }
    for index in indexes.values():
        index.add(np.arange(entries), keys)
    indexes["all_rows"].add(np.array([capacity - 1]), keys[:1])
    seconds = paired_search_seconds(indexes, torch.from_numpy(queries), k, warmup, repeats)
    return {
        "capacity": capacity,
        "entries": entries,
        "dim": dim,
        "queries": n_queries,
        "k": k,
        "seconds": seconds,
        "speedup": seconds["all_rows"] / seconds["live_rows"],
    }


def exact_blocks(
    rows: int, dim: int, n_queries: int, k: int, exponents: list[int], warmup: int, repeats: int
) -> dict[str, Any]:
    """Exact search of ``n_queries`` among ``rows`` keys with blocks of ``2^e`` distances for each of
    ``exponents``, side by side (the default, ``MAX_BLOCK_ELEMENTS``, among them or not)."""
    from dmt.memory.exact import MAX_BLOCK_ELEMENTS, ExactIndex

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((rows, dim)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((n_queries, dim)).astype(np.float32))
    indexes: dict[str, KeyIndex] = {}
    for exponent in exponents:
        index = ExactIndex(dim, "cosine", rows)
        index.add(np.arange(rows), keys)
        index.block_elements = 2**exponent
        indexes[f"2^{exponent}"] = index
    seconds = paired_search_seconds(indexes, queries, k, warmup, repeats)
    return {
        "rows": rows,
        "dim": dim,
        "queries": n_queries,
        "k": k,
        "default": f"2^{MAX_BLOCK_ELEMENTS.bit_length() - 1}",
        "seconds": seconds,
        "fastest": min(seconds, key=seconds.__getitem__),
    }


def live_keys(store: KNNStore) -> np.ndarray:
    """All keys of a full store by slot, read in chunks so the values are never copied at once."""
    chunks = [
        store.get(np.arange(b, min(b + 65536, store.capacity)))[0] for b in range(0, store.capacity, 65536)
    ]
    return np.concatenate(chunks)


def index_quality(
    store: KNNStore, k: int, n_queries: int, batch: int, warmup: int, repeats: int
) -> dict[str, float]:
    """Recall@k (queries near stored keys and random ones), query and insert throughput of a full store.

    Churn inserts go last: the store is full, so every one evicts an LRFU victim and replaces its key.
    Stores with fixed keys (product keys) cannot insert; their churn rate is ``None``.
    """
    rng = np.random.default_rng(1)
    keys = live_keys(store)
    stored = keys[rng.choice(len(keys), n_queries, replace=False)]
    # Noise of 10% of a key's norm per vector: near, but not on, a stored key.
    near = stored + 0.1 * rng.standard_normal(stored.shape, dtype=np.float32) * np.linalg.norm(
        stored, axis=1, keepdims=True
    ) / np.sqrt(store.key_dim)
    random = rng.standard_normal((n_queries, store.key_dim), dtype=np.float32)
    recall = {"recall_near": store.recall(near, k), "recall_random": store.recall(random, k)}
    queries = rng.standard_normal((batch, store.key_dim), dtype=np.float32)
    query_s = median_seconds(lambda: search_and_read(store, queries, k), warmup, repeats)
    # Fresh rows per call: re-inserting a batch would find its own keys already stored.
    fresh = iter(
        [
            (
                rng.standard_normal((batch, store.key_dim), dtype=np.float32),
                rng.standard_normal((batch, store.value_dim), dtype=np.float32),
            )
            for _ in range(warmup + repeats)
        ]
    )
    churn_s = (
        None if store.keys_are_fixed else median_seconds(lambda: store.insert(*next(fresh)), warmup, repeats)
    )
    return {
        "k": float(k),
        **recall,
        "queries_per_s": batch / query_s,
        "churn_inserts_per_s": None if churn_s is None else batch / churn_s,
    }


def layer_benchmarks(
    kind: str, size: int, cache_dir: Path, batch: int, seq: int, warmup: int, repeats: int, n_queries: int
) -> dict[str, Any]:
    """Index quality, fwd+bwd time beside the GPT-2 MLP's (same batches, interleaved), multiply-adds per
    token beside the MLP's (:mod:`dmt.layers.arithmetic`) and a profile of one ``kind`` layer over a full
    ``size``-entry store."""
    cfg = layer_config(kind, size, GPT2_WIDTH)
    store, build = cached_store(StoreSpec.for_layer(cfg), cache_dir)
    index = index_quality(store, cfg.topk, n_queries, batch * seq, warmup, repeats)
    layer = memory_layer(cfg, store)
    multiply_adds = layer_multiply_adds(layer)  # of the full store, which the timed steps keep full
    mlp_multiply_add_count = mlp_multiply_adds(mlp_form(GPT2Config()))
    torch.manual_seed(0)
    mlp = gpt2_mlp()
    # Two batches beyond the timed steps: the profile's warm-up and profiled steps see new ones too.
    inputs = layer_inputs(batch, seq, warmup + repeats + 2)
    layer_step = feeding(layer, inputs)
    seconds = paired_median_seconds({"layer": layer_step, "mlp": feeding(mlp, inputs)}, warmup, repeats)
    return {
        "layer": kind,
        "size": size,
        "settings": cfg.to_dict(),
        "store_build": build,
        "index": index,
        "median_s": seconds["layer"],
        "mlp_median_s": seconds["mlp"],
        "ratio_vs_mlp": seconds["layer"] / seconds["mlp"],
        "per_token_us": seconds["layer"] / (batch * seq) * 1e6,
        "mlp_per_token_us": seconds["mlp"] / (batch * seq) * 1e6,
        "multiply_adds": multiply_adds.to_dict(),
        "mlp_multiply_adds": mlp_multiply_add_count,
        "multiply_adds_vs_mlp": multiply_adds.total / mlp_multiply_add_count,
        "profile": profile_step(layer_step),
    }


def distillation_students(
    teacher: GPT2LMHeadModel, cache_dir: Path, size: int
) -> dict[str, DistillationModule]:
    """Dense and memory students of ``teacher``: the memory one has a featural layer in block n/2 and an
    associative one in the top block (upper half), both over full ``size``-entry stores."""
    n_layer = teacher.config.n_layer
    kinds = {n_layer // 2: "featural", n_layer - 1: "associative"}
    configs = {index: layer_config(kind, size, teacher.config.n_embd) for index, kind in kinds.items()}
    stores = {index: cached_store(StoreSpec.for_layer(cfg), cache_dir)[0] for index, cfg in configs.items()}
    students = {}
    for name, layers in (("dense", {}), ("memory", configs)):
        torch.manual_seed(0)
        # build_student without its fresh (empty) stores: the memory student starts from full ones.
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        attach_memory_layers(student, layers, stores)
        module = DistillationModule(student, teacher)
        module.on_fit_start()  # deferred writes, committed after each optimiser step as in training
        students[name] = module
    return students


def distillation_step(module: DistillationModule, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One training step as Lightning runs it: loss, backward, value write-back, AdamW, commit."""
    optimizer.zero_grad(set_to_none=True)
    module.losses(batch)["loss"].backward()
    module.memory.write_back_values()
    optimizer.step()
    module.memory.commit()


def distillation_throughput(
    model: GPT2Config, cache_dir: Path, size: int, batch: int, seq: int, warmup: int, repeats: int
) -> dict[str, Any]:
    """Tokens/s of distillation steps of the memory student and of the dense student, same teacher."""
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(model).eval()
    generator = torch.Generator().manual_seed(0)
    # A new batch per step (the same sequence for both students), as in training; see `layer_inputs`.
    batches = [
        {
            "input_ids": torch.randint(0, model.vocab_size, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(warmup + repeats)
    ]
    result: dict[str, Any] = {"model": model.to_diff_dict(), "store_size": size, "batch": batch, "seq": seq}
    modules = distillation_students(teacher, cache_dir, size)
    optimizers = {name: torch.optim.AdamW(m.student.parameters(), lr=3e-4) for name, m in modules.items()}
    feeds = {name: itertools.cycle(batches) for name in modules}
    seconds = paired_median_seconds(
        {
            name: lambda n=name: distillation_step(modules[n], optimizers[n], next(feeds[n]))
            for name in modules
        },
        warmup,
        repeats,
    )
    for name, module in modules.items():
        result[name] = {
            "median_s": seconds[name],
            "tokens_per_s": batch * seq / seconds[name],
            "memory_layers": {i: layer.cfg.type for i, layer in memory_layers(module.student).items()},
        }
    result["ratio_vs_dense"] = result["memory"]["tokens_per_s"] / result["dense"]["tokens_per_s"]
    return result


def resident_after_load(directory: Path, mmap: bool) -> dict[str, float]:
    """RSS growth of this process while loading the store in ``directory`` and once it is held."""
    gc.collect()
    with PeakRSS() as rss:
        store = KNNStore.load(directory, mmap=mmap, verify=False)
    held = rss.end - rss.start
    del store
    gc.collect()
    return {"peak_delta_bytes": float(rss.peak - rss.start), "held_delta_bytes": float(held)}


def memory_footprint(size: int, cache_dir: Path) -> dict[str, Any]:
    """Build peak, held and memory-mapped RSS and disk size of a ``size``-entry featural store with
    GPT-2-width (768-d) values, in float32 and float16."""
    spec = StoreSpec.for_layer(layer_config("featural", size, GPT2_WIDTH))
    store, build = cached_store(spec, cache_dir, mmap=True)  # a build here is measured in `build`
    directories = {"float32": Path(cache_dir) / spec.name / "store"}
    del store
    directories["float16"] = float16_copy(spec, cache_dir)
    result: dict[str, Any] = {
        "size": size,
        "key_dim": spec.key_dim,
        "value_dim": spec.value_dim,
        "build": {k: build[k] for k in ("build_s", "build_peak_rss_delta_bytes", "from_cache")},
    }
    for dtype, directory in directories.items():
        result[dtype] = {
            "disk_bytes": float(directory_bytes(directory)),
            "load": resident_after_load(directory, mmap=False),
            "load_mmap": resident_after_load(directory, mmap=True),
        }
    return result
