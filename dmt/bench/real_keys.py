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

Layer rows (:func:`layer_row`) time whole memory layers of GPT-2 width on the faiss index over the same
keys, against the GPT-2 MLP they replace, on batches of held-out keys in document order (one new batch per
step): ``featural`` and ``associative`` train (forward and backward, inserting the novel
queries and evicting, as in training), ``read_only`` is an associative layer that never inserts (a
memorised pack) timed forward only, against the MLP's forward; the ``*_scann`` rows the three on the
ScaNN index, and the ``*_exact`` rows on exact search, for a GPU: with ``device`` the layers,
their stores and the MLP run there (exact search on the device; faiss and ScaNN stay on the host), and each
timed step waits for the device. The layer's query (and key) projection is
aimed at the keys (:func:`aim_at_keys`): its search is exactly the held-out keys' search, at the
projection's usual cost.

Keys come from a pack, or from a ``.npy`` file of keys ``(N, D)`` (:func:`load_keys`): a sample of a
pack's keys small enough to travel where the pack cannot (``benchmarks/device_check.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmt.bench.measure import (
    GPT2_WIDTH,
    feeding,
    gpt2_mlp,
    memory_layer,
    paired_median_seconds,
    search_and_read,
)
from dmt.bench.profile import profile_step
from dmt.bench.stores import FILL_BATCH, PeakRSS, StoreSpec, layer_config
from dmt.errors import InputFileError
from dmt.kernel.pack_files import SHARDS, array_file
from dmt.layers import MemoryLayer
from dmt.memory import KNNStore
from dmt.packs.files import PackError, read_pack

# Values stored per entry: the width of a GPT-2 block's output, in float16 (what a read copies).
VALUE_DIM = 768
VALUE_DTYPE = "float16"
CPU = torch.device("cpu")
# The layers timed on real keys, by row: the dmt.bench layer (on the faiss index, or scann's), the ``swap``
# overrides beyond the keys' width, and whether it trains (forward and backward, inserting) or only reads.
# The associative rows take the Shakespeare cache's shape (one head, top-32), the read-only ones its float16
# values and no inserts.
READ_ONLY = (
    "swap.read.heads=1",
    "swap.read.topk=32",
    "swap.write.novelty_threshold=null",
    "swap.store.value_dtype=float16",
)
LAYER_ROWS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "featural": ("featural_faiss", (), True),
    "associative": ("associative_faiss", ("swap.read.heads=1", "swap.read.topk=32"), True),
    "read_only": ("associative_faiss", READ_ONLY, False),
    "read_only_scann": ("associative_scann", READ_ONLY, False),
    "featural_scann": ("featural_scann", (), True),
    "associative_scann": ("associative_scann", ("swap.read.heads=1", "swap.read.topk=32"), True),
    "featural_exact": ("featural_exact", (), True),
    "associative_exact": ("associative_exact", ("swap.read.heads=1", "swap.read.topk=32"), True),
    "read_only_exact": ("associative_exact", READ_ONLY, False),
}
# Rows timed only when named (--key-layers): exact search of a million keys belongs on a GPU.
EXACT_ROWS = ("featural_exact", "associative_exact", "read_only_exact")


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


def load_keys(path: str | Path, count: int | None = None) -> np.ndarray:
    """The first ``count`` (None: all) keys ``(count, key_dim)`` float32 of ``path``: a memory pack
    (:func:`pack_keys`), or a ``.npy`` file of keys ``(N, key_dim)`` (any float dtype).

    Raises:
        PackError: the pack is not one, or too small.
        InputFileError: the ``.npy`` file is not a 2-D float array, or holds fewer than ``count`` keys.
    """
    path = Path(path)
    if path.suffix != ".npy":
        return pack_keys(path, count)
    try:
        keys = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputFileError(f"{path}: not a readable .npy key file ({error})") from error
    if keys.ndim != 2 or keys.dtype.kind != "f":
        raise InputFileError(f"{path}: keys must be a 2-D float array, got {keys.dtype} {keys.shape}")
    if count is not None and len(keys) < count:
        raise InputFileError(f"{path}: {len(keys)} keys, fewer than the {count} asked for")
    return np.asarray(keys[:count], dtype=np.float32)


def key_sets(
    keys_pack: Path, queries_pack: Path, size: int, churn: int, queries: int, stream: int = 0
) -> dict[str, dict]:
    """``{"real": ..., "gaussian": ...}``, each ``{"keys": (size, D), "churn": (churn, D), "calibration":
    (queries, D), "queries": (queries, D), "stream": (stream, D)}``: the real set from the two packs, the
    Gaussian one drawn to the same shapes. An index that tunes itself on its first queries (faiss) sees
    ``calibration`` first; recall and time are measured on the other, disjoint, ``queries``. ``stream``:
    the first held-out keys in document order, what a layer reading the held-out text searches with."""
    stored = load_keys(keys_pack, size + churn)
    held_out = load_keys(queries_pack)
    if len(held_out) < max(2 * queries, stream):
        raise PackError(
            f"{queries_pack}: {len(held_out)} held-out keys, fewer than 2 x {queries} queries or a stream "
            f"of {stream}"
        )
    pick = np.random.default_rng(0).permutation(len(held_out))
    real = {
        "keys": stored[:size],
        "churn": stored[size:],
        "calibration": held_out[np.sort(pick[:queries])],
        "queries": held_out[np.sort(pick[queries : 2 * queries])],
        "stream": held_out[:stream],
    }
    rng = np.random.default_rng(0)
    gaussian = {name: rng.standard_normal(array.shape, dtype=np.float32) for name, array in real.items()}
    return {"real": real, "gaussian": gaussian}


def fill(store: KNNStore, keys: np.ndarray) -> dict[str, float]:
    """Insert ``keys (M, D)`` (random values) into the empty ``store``; its build facts: seconds, inserts/s
    and peak RSS growth."""
    rng = np.random.default_rng(1)
    with PeakRSS() as rss:
        started = time.perf_counter()
        for begin in range(0, len(keys), FILL_BATCH):
            batch = keys[begin : begin + FILL_BATCH]
            store.insert(batch, rng.standard_normal((len(batch), store.value_dim), dtype=np.float32))
        seconds = time.perf_counter() - started
    return {
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
    size, dim = keys["keys"].shape
    store = KNNStore(dim, VALUE_DIM, size, metric, value_dtype=VALUE_DTYPE, index={"backend": backend})
    build = fill(store, keys["keys"])
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
        "size": size,
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


def aim_at_keys(layer: MemoryLayer, dim: int) -> None:
    """Make ``layer``'s query projection (and key projection, where it has one) copy the first ``dim``
    features of its input to every head: fed hidden states that begin with a key, the layer searches (and
    inserts) with that key. The projection's cost does not depend on its weights."""
    with torch.no_grad():
        for projection in (layer.query_proj, getattr(layer, "key_proj", None)):
            if projection is None:
                continue
            projection.weight.zero_()
            projection.bias.zero_()
            projection.weight[:, :dim] = torch.eye(dim).repeat(projection.weight.shape[0] // dim, 1)


def key_inputs(
    stream: np.ndarray, count: int, batch: int, seq: int, grad: bool, device: torch.device = CPU
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of hidden states ``(batch, seq, 768)`` on ``device`` beginning with the next keys
    of ``stream`` (the other features N(0, 1)), with upstream gradients; the hidden states require grad
    when ``grad``."""
    tokens = batch * seq
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for begin in range(0, count * tokens, tokens):
        hidden = torch.randn(batch, seq, GPT2_WIDTH, generator=generator)
        keys = torch.from_numpy(np.ascontiguousarray(stream[begin : begin + tokens]))  # (B·T, D)
        hidden[..., : stream.shape[1]] = keys.reshape(batch, seq, -1)
        upstream = torch.randn(batch, seq, GPT2_WIDTH, generator=generator)
        inputs.append((hidden.to(device).requires_grad_(grad), upstream.to(device)))
    return inputs


def reading(module: torch.nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """A step running ``module``'s forward (eval, no grad) on the next of ``inputs`` at each call."""
    feed = iter(inputs)
    module.eval()

    def step() -> None:
        with torch.no_grad():
            module(next(feed)[0])

    return step


def synchronized(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step``, returning only once ``device`` has finished its work (a CUDA step is queued, not done,
    when its Python call returns); ``step`` itself on the CPU."""
    if device.type != "cuda":
        return step

    def waited() -> None:
        step()
        torch.cuda.synchronize(device)

    return waited


def layer_row(
    name: str,
    keys: dict[str, np.ndarray],
    batch: int,
    seq: int,
    warmup: int,
    repeats: int,
    device: torch.device = CPU,
) -> dict[str, Any]:
    """One :data:`LAYER_ROWS` layer over a store filled with ``keys["keys"]``, stepped on ``(batch,
    seq)`` batches of ``keys["stream"]`` beside the GPT-2 MLP on the same hidden states, both on
    ``device``: median seconds, their ratio, the inserts and evictions per step, recall@k of the next
    (unseen) batch's queries, and a profile."""
    kind, overrides, trains = LAYER_ROWS[name]
    size, dim = keys["keys"].shape
    cfg = layer_config(kind, size, GPT2_WIDTH, (f"swap.read.key_dim={dim}", *overrides))
    store = StoreSpec.for_layer(cfg).empty_store()
    build = fill(store, keys["keys"])
    layer = memory_layer(cfg, store).to(device)  # the store follows at the first search
    aim_at_keys(layer, dim)
    torch.manual_seed(0)
    mlp = gpt2_mlp().to(device)
    # The timed steps, then an unseen batch for recall, then the profile's warm-up and profiled steps.
    inputs = key_inputs(keys["stream"], warmup + repeats + 2, batch, seq, trains, device)
    step = synchronized(feeding(layer, inputs) if trains else reading(layer, inputs), device)
    mlp_step = synchronized(feeding(mlp, inputs) if trains else reading(mlp, inputs), device)
    before = store.stats
    inserts, evictions = before.inserts, before.evictions
    seconds = paired_median_seconds({"layer": step, "mlp": mlp_step}, warmup, repeats)
    unseen = inputs[warmup + repeats][0][..., :dim].reshape(-1, dim).detach().cpu().numpy()
    recall = store.recall(unseen, cfg.topk)
    steps = warmup + repeats
    return {
        "layer": name,
        "trains": trains,
        "device": str(device),
        "size": size,
        "settings": cfg.to_dict(),
        "build": build,
        "index_state": store.index_state,
        "recall_held_out": recall,
        "inserts_per_step": (store.stats.inserts - inserts) / steps,
        "evictions_per_step": (store.stats.evictions - evictions) / steps,
        "median_s": seconds["layer"],
        "mlp_median_s": seconds["mlp"],
        "ratio_vs_mlp": seconds["layer"] / seconds["mlp"],
        "profile": profile_step(step),
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
    layers: list[str],
    layer_shape: tuple[int, int],
    key_set_names: list[str] | None = None,
    device: torch.device = CPU,
) -> dict[str, Any]:
    """Every backend on the real and the Gaussian key sets of ``size`` entries (cosine, the pack's key
    width): one :func:`index_row` each (on the host), then one :func:`layer_row` per ``layers`` name on
    batches of ``layer_shape`` (sequences, tokens) on ``device``, built and measured one store at a time;
    ``key_set_names``: the key sets measured (None: both)."""
    stream = (warmup + repeats + 2) * layer_shape[0] * layer_shape[1] if layers else 0
    sets = key_sets(keys_pack, queries_pack, size, (warmup + repeats) * churn, batch, stream)
    sets = {name: keys for name, keys in sets.items() if key_set_names is None or name in key_set_names}
    rows = [
        {"keys": name, **index_row(backend, keys, "cosine", k, churn, warmup, repeats)}
        for name, keys in sets.items()
        for backend in backends
    ]
    layer_rows = [
        {"keys": name, **layer_row(layer, keys, *layer_shape, warmup, repeats, device)}
        for name, keys in sets.items()
        for layer in layers
    ]
    return {
        "keys_pack": str(keys_pack),
        "queries_pack": str(queries_pack),
        "key_dim": int(next(iter(sets.values()))["keys"].shape[1]),
        "metric": "cosine",
        "rows": rows,
        "layer_rows": layer_rows,
    }
