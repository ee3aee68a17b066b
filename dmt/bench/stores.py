"""Layer settings composed from ``conf/swap`` and prefilled, disk-cached ``KNNStore``s of a given size.

Filling a store goes through ``KNNStore.insert``, which adds to hnswlib on one thread, so a large store is
slow to build; built stores are therefore saved once under a cache directory and loaded later.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import GPT2Config

from dmt.layers import MemoryConfig
from dmt.layers.swap import swap_settings
from dmt.memory import KNNStore
from dmt.memory.backends import resolve_backend
from dmt.model.surgery import resolve_layer_configs

# Rows per insert call while filling: large enough that per-call costs (live-mask scans) vanish.
FILL_BATCH = 65536
BUILD_INFO = "build.json"


# Benchmarked layers → the ``conf/swap`` option they are and the ``conf/swap/index`` option they use
# instead of the option's own (None: the option's).
LAYER_KINDS: dict[str, tuple[str, str | None]] = {
    "featural": ("featural", None),
    "associative": ("associative", None),
    "featural_product": ("featural_product", None),
    "featural_faiss": ("featural", "faiss"),
    "associative_faiss": ("associative", "faiss"),
    "associative_scann": ("associative", "scann"),
    "featural_scann": ("featural", "scann"),
    "featural_exact": ("featural", "exact"),
    "associative_exact": ("associative", "exact"),
}
# Kinds timed only when named: scann's are timed on real keys (``--keys``), exact search of a large store
# belongs on a GPU (``dmt.bench --device cuda``).
ON_REQUEST = ("associative_scann", "featural_scann", "featural_exact", "associative_exact")


def layer_config(kind: str, capacity: int, d_model: int, overrides: tuple[str, ...] = ()) -> MemoryConfig:
    """The resolved settings of the benchmarked layer ``kind`` (:data:`LAYER_KINDS`, e.g. ``featural``)
    for one layer of ``capacity`` in a GPT-2 of width ``d_model``, with Hydra ``overrides`` of ``swap``
    (e.g. ``swap.read.key_dim=64``) applied last."""
    option, backend = LAYER_KINDS[kind]
    index = [f"swap/index={backend}"] if backend else []
    overrides = (f"swap={option}", "swap.blocks=[0]", f"swap.store.capacity={capacity}", *index, *overrides)
    with initialize_config_module("dmt.conf", version_base="1.3"):
        swap = compose("distill", list(overrides)).swap
    settings = swap_settings(OmegaConf.to_container(swap, resolve=True))  # type: ignore[arg-type]
    return resolve_layer_configs(settings, GPT2Config(n_layer=1, n_embd=d_model))[0]  # type: ignore[return-value]


@dataclass(frozen=True)
class StoreSpec:
    """Everything that determines a prefilled store's contents (and so its cache entry)."""

    key_dim: int
    value_dim: int
    size: int
    metric: str
    index: tuple[tuple[str, int | str], ...]
    value_dtype: str = "float32"
    seed: int = 0

    @classmethod
    def for_layer(cls, cfg: MemoryConfig) -> StoreSpec:
        """A full store (``size == capacity``) shaped for a layer of the resolved ``cfg``."""
        # A store entry holds the value and, for gated featural memory, the gate key after it.
        value_dim = cfg.value_dim + cfg.gate_width
        # The concrete backend names the cache entry: `auto` builds different stores at different sizes.
        settings = {
            **cfg.index,
            "backend": resolve_backend(cfg.index.get("backend", "hnsw"), cfg.key_dim, cfg.capacity),
        }
        index = tuple(sorted(settings.items()))
        return cls(cfg.key_dim, value_dim, cfg.capacity, cfg.metric, index, cfg.value_dtype)

    @property
    def name(self) -> str:
        params = "_".join(f"{k}{v}" for k, v in self.index)
        return (
            f"k{self.key_dim}_v{self.value_dim}_n{self.size}_{self.metric}_{params}_{self.value_dtype}"
            f"_s{self.seed}"
        )

    def empty_store(self) -> KNNStore:
        return KNNStore(
            self.key_dim,
            self.value_dim,
            self.size,
            self.metric,
            value_dtype=self.value_dtype,
            index=dict(self.index),
        )


class PeakRSS:
    """Context manager sampling this process's resident set size in a thread; the peak is kept.

    Polling (not ``ru_maxrss``) because the process-wide high-water mark cannot be reset between phases.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.start = self.peak = self.end = 0

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _poll(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = self.rss()
        self.peak = max(self.peak, self.end)


def fill_store(spec: StoreSpec) -> tuple[KNNStore, dict[str, float | None]]:
    """A store of ``spec`` filled with random N(0, 1) keys and values in ``FILL_BATCH`` inserts.

    Returns the store and build facts: seconds, inserts/s overall and of the last batch (a nearly full
    graph, the rate a long-running store sees), and the peak RSS growth while building. A store with
    fixed keys (product keys) gets random values only, and no insert rates.
    """
    rng = np.random.default_rng(spec.seed)
    with PeakRSS() as rss:
        start = time.perf_counter()
        store = spec.empty_store()
        fixed_keys = store.keys_are_fixed
        last_rate = 0.0
        for begin in range(0, spec.size, FILL_BATCH):
            rows = min(FILL_BATCH, spec.size - begin)
            keys = rng.standard_normal((rows, spec.key_dim), dtype=np.float32)
            values = rng.standard_normal((rows, spec.value_dim), dtype=np.float32)
            batch_start = time.perf_counter()
            if fixed_keys:
                store.update_values(np.arange(begin, begin + rows), values)
            else:
                store.insert(keys, values)
            last_rate = rows / (time.perf_counter() - batch_start)
        seconds = time.perf_counter() - start
    info = {
        "build_s": seconds,
        "inserts_per_s": None if fixed_keys else spec.size / seconds,
        "last_batch_inserts_per_s": None if fixed_keys else last_rate,
        "build_peak_rss_delta_bytes": float(rss.peak - rss.start),
    }
    return store, info


def directory_bytes(directory: Path) -> int:
    """Bytes of every file under ``directory``, subdirectories included."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def cached_store(spec: StoreSpec, cache_dir: Path, mmap: bool = False) -> tuple[KNNStore, dict[str, Any]]:
    """The prefilled store of ``spec``: loaded from ``cache_dir`` if present, else built and saved there.

    The returned info holds the build facts (from the original build when cached, ``from_cache`` says so),
    the on-disk size and the hnswlib parameters as saved. A store loaded with ``mmap`` maps its keys and
    values copy-on-write: writes stay in memory and the cache is never changed.
    """
    entry = cache_dir / spec.name
    store_dir, info_path = entry / "store", entry / BUILD_INFO
    if info_path.exists():
        info = json.loads(info_path.read_text())
        # verify=False: the cache is this tool's own output; hashing would read the whole store at every load.
        store = KNNStore.load(store_dir, mmap=mmap, verify=False)
        info["from_cache"] = True
    else:
        store, info = fill_store(spec)
        store.save(store_dir)
        info["disk_bytes"] = directory_bytes(store_dir)
        info["index_params"] = json.loads((store_dir / "manifest.json").read_text())["index_params"]
        info_path.write_text(json.dumps(info, indent=2))  # written last: marks the entry complete
        info["from_cache"] = False
        if mmap:
            store = KNNStore.load(store_dir, mmap=True, verify=False)
    return store, info


def float16_copy(spec: StoreSpec, cache_dir: Path) -> Path:
    """Directory of the ``float16``-values twin of the float32 store of ``spec`` (cached).

    Converted through ``state_dict`` so the hnswlib graph (keys only) is reused instead of rebuilt.
    """
    twin = StoreSpec(**{**spec.__dict__, "value_dtype": "float16"})
    directory = cache_dir / twin.name / "store"
    if not (directory / "manifest.json").exists():
        store, _ = cached_store(spec, cache_dir, mmap=True)
        state = store.state_dict()
        del store
        state["values"] = state["values"].astype(np.float16)
        state["value_dtype"] = "float16"
        KNNStore.from_state_dict(state).save(directory)
    return directory
