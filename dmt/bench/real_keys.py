"""Key indexes on keys a model makes, beside iid Gaussian keys of the same shape (the worst case).

Real keys come from a memory pack (``dmt-memorize``): the keys of its memory layer in document order, the
first ``size`` filling the store and the next ones arriving as churn (inserts that evict). Real queries are
the keys of a second pack memorised from held-out text: what the same layer makes on text it never stored.
The Gaussian set draws keys, churn and queries alike from N(0, 1).

For each key set and backend, one store is filled and measured side by side with the GPT-2 MLP
(768-3072-768) on as many tokens as queries, interleaved:

- ``read``: the top-k search of ``batch`` queries and the copy of the returned keys and values (a
  read-only layer, a memorised pack) against the MLP's forward: the read-only target is <= 1.0x;
- ``churn``: inserting ``churn`` fresh keys into the full store (each evicts one) against the same forward;
- recall@k of the held-out queries and of queries near stored keys, against exact search.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.bench.measure import gpt2_mlp, paired_median_seconds, search_and_read
from dmt.bench.stores import FILL_BATCH, PeakRSS
from dmt.kernel.pack_files import SHARDS, array_file
from dmt.memory import KNNStore
from dmt.packs.files import PackError, read_pack

# Values stored per entry: the width of a GPT-2 block's output, in float16 (what a read copies).
VALUE_DIM = 768
VALUE_DTYPE = "float16"


def pack_keys(pack: str | Path, count: int | None = None) -> np.ndarray:
    """The first ``count`` (None: all) keys ``(count, key_dim)`` of the one memory layer of ``pack``, in
    document order.

    Raises:
        PackError: the pack is not one, holds several layers, or fewer than ``count`` keys.
    """
    pack = Path(pack)
    manifest = read_pack(pack)
    if len(manifest.layers) != 1:
        raise PackError(
            f"{pack}: keys come from a pack of one memory layer, this one has {sorted(manifest.layers)}"
        )
    (block,) = manifest.layers
    total = sum(document.entries.get(block, 0) for document in manifest.documents)
    count = total if count is None else count
    if total < count:
        raise PackError(f"{pack}: {total} keys in layer {block}, fewer than the {count} asked for")
    chunks, held = [], 0
    for document in manifest.documents:
        if held >= count:
            break
        path = pack / SHARDS / document.shard / array_file(block, "keys")
        try:
            keys = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise PackError(f"{path}: not a readable key file ({error})") from error
        if keys.ndim != 2 or len(keys) != document.entries.get(block, 0):
            raise PackError(f"{path}: shape {keys.shape}, expected {document.entries.get(block, 0)} keys")
        chunks.append(np.asarray(keys[: count - held], dtype=np.float32))
        held += len(chunks[-1])
    return np.concatenate(chunks)


def key_sets(keys_pack: Path, queries_pack: Path, size: int, churn: int, queries: int) -> dict[str, dict]:
    """``{"real": ..., "gaussian": ...}``, each ``{"keys": (size, D), "churn": (churn, D), "calibration":
    (queries, D), "queries": (queries, D)}``: the real set from the two packs, the Gaussian one drawn to
    the same shapes. An index that tunes itself on its first queries (faiss) sees ``calibration`` first;
    recall and time are measured on the other, disjoint, ``queries``."""
    stored = pack_keys(keys_pack, size + churn)
    held_out = pack_keys(queries_pack)
    if len(held_out) < 2 * queries:
        raise PackError(f"{queries_pack}: {len(held_out)} held-out keys, fewer than 2 x {queries} queries")
    pick = np.random.default_rng(0).permutation(len(held_out))
    real = {
        "keys": stored[:size],
        "churn": stored[size:],
        "calibration": held_out[np.sort(pick[:queries])],
        "queries": held_out[np.sort(pick[queries : 2 * queries])],
    }
    rng = np.random.default_rng(0)
    gaussian = {name: rng.standard_normal(array.shape, dtype=np.float32) for name, array in real.items()}
    return {"real": real, "gaussian": gaussian}


def filled_store(backend: str, keys: np.ndarray, metric: str) -> tuple[KNNStore, dict[str, float]]:
    """A store of exactly ``len(keys)`` entries on ``backend`` holding ``keys`` (random values), and its
    build facts: seconds, inserts/s and peak RSS growth."""
    rng = np.random.default_rng(1)
    with PeakRSS() as rss:
        started = time.perf_counter()
        store = KNNStore(
            keys.shape[1], VALUE_DIM, len(keys), metric, value_dtype=VALUE_DTYPE, index={"backend": backend}
        )
        for begin in range(0, len(keys), FILL_BATCH):
            batch = keys[begin : begin + FILL_BATCH]
            store.insert(batch, rng.standard_normal((len(batch), VALUE_DIM), dtype=np.float32))
        seconds = time.perf_counter() - started
    return store, {
        "build_s": seconds,
        "inserts_per_s": len(keys) / seconds,
        "build_peak_rss_delta_bytes": float(rss.peak - rss.start),
    }


def near_queries(keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` stored keys with noise of 10% of their norm: near, but not on, a stored key."""
    rng = np.random.default_rng(2)
    stored = keys[rng.choice(len(keys), count, replace=False)]
    noise = rng.standard_normal(stored.shape, dtype=np.float32)
    return stored + 0.1 * noise * np.linalg.norm(stored, axis=1, keepdims=True) / np.sqrt(keys.shape[1])


def mlp_forward(tokens: int) -> Callable[[], None]:
    """A step running the GPT-2 MLP's forward (eval, no grad) on ``tokens`` hidden states."""
    torch.manual_seed(0)
    mlp = gpt2_mlp().eval()
    hidden = torch.randn(tokens, mlp.c_fc.weight.shape[0])

    def step() -> None:
        with torch.no_grad():
            mlp(hidden)

    return step


def index_row(
    backend: str, keys: dict[str, np.ndarray], metric: str, k: int, churn: int, warmup: int, repeats: int
) -> dict[str, Any]:
    """Build, recall and side-by-side read and churn times of one ``backend`` store over one key set."""
    store, build = filled_store(backend, keys["keys"], metric)
    store.search(keys["calibration"], k)  # the first search after filling: faiss calibrates nprobe here
    queries = keys["queries"]
    recall = {
        "recall_held_out": store.recall(queries, k),
        "recall_near": store.recall(near_queries(keys["keys"], len(queries)), k),
    }
    batches = iter(np.split(keys["churn"][: (warmup + repeats) * churn], warmup + repeats))
    values = np.zeros((churn, store.value_dim), dtype=np.float32)
    seconds = paired_median_seconds(
        {
            "read": lambda: search_and_read(store, queries, k),
            "churn": lambda: store.insert(next(batches), values),
            "mlp_forward": mlp_forward(len(queries)),
        },
        warmup,
        repeats,
    )
    return {
        "backend": backend,
        "size": len(keys["keys"]),
        "k": k,
        "build": build,
        **recall,
        "index_state": store.index_state,
        "read_s": seconds["read"],
        "churn_s": seconds["churn"],
        "mlp_forward_s": seconds["mlp_forward"],
        "read_vs_mlp_forward": seconds["read"] / seconds["mlp_forward"],
        "queries_per_s": len(queries) / seconds["read"],
        "churn_inserts_per_s": churn / seconds["churn"],
    }


def real_key_benchmark(
    keys_pack: Path,
    queries_pack: Path,
    size: int,
    backends: list[str],
    batch: int,
    churn: int,
    k: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Every backend on the real and the Gaussian key sets of ``size`` entries (cosine, the pack's key
    width): one :func:`index_row` each, built and measured one store at a time."""
    sets = key_sets(keys_pack, queries_pack, size, (warmup + repeats) * churn, batch)
    rows = [
        {"keys": name, **index_row(backend, keys, "cosine", k, churn, warmup, repeats)}
        for name, keys in sets.items()
        for backend in backends
    ]
    return {
        "keys_pack": str(keys_pack),
        "queries_pack": str(queries_pack),
        "key_dim": int(sets["real"]["keys"].shape[1]),
        "metric": "cosine",
        "rows": rows,
    }
