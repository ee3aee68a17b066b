"""Where a memory layer's training step spends its time: cProfile's cumulative times, grouped by phase."""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

# Profile phase → (file suffix, function name) of the functions whose cumulative time it is.
PROFILE_FUNCTIONS: dict[str, list[tuple[str, str]]] = {
    "projections": [("torch/nn/modules/linear.py", "forward")],
    "layer_search": [("dmt/layers/base.py", "search")],
    "search": [
        ("dmt/memory/hnsw.py", "search"),
        ("dmt/kernel/search.py", "search_table"),
        ("dmt/memory/product.py", "_search_on_device"),
        ("dmt/memory/faiss_ivf.py", "_approximate"),
        ("dmt/memory/scann_index.py", "_approximate"),
    ],
    "lrfu_reference": [("dmt/memory/store.py", "reference")],
    "weighted_sum": [
        ("dmt/kernel/ops.py", "neighbour_distances"),
        ("dmt/kernel/ops.py", "neighbour_dots"),
        ("dmt/kernel/ops.py", "neighbour_weights"),
        ("dmt/kernel/ops.py", "mix_values"),
        ("dmt/layers/straight_through.py", "distances_straight_through"),
        ("dmt/layers/straight_through.py", "mix_values_straight_through"),
        ("dmt/memory/metrics.py", "distance"),
    ],
    "insert": [("dmt/layers/base.py", "insert_novel")],
    "backward": [("torch/_tensor.py", "backward")],
    "value_update": [("dmt/layers/base.py", "apply_value_updates")],
}


def profile_step(step: Callable[[], None]) -> dict[str, Any]:
    """Split one (warm) training ``step`` of a memory layer into phases by cProfile cumulative times.

    The layer's search is split into the index search and the rest (LRFU bookkeeping, copying the
    distinct returned entries out of the store into torch tensors), reported as the gather. A phase's time
    counts only calls from outside the phase, so functions of one phase that call each other are not
    counted twice.
    """
    step()  # warm caches and allocator
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(step)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def in_phase(function: tuple[str, int, str], functions: list[tuple[str, str]]) -> bool:
        path, _line, name = function
        return any(path.endswith(suffix) and name == fn for suffix, fn in functions)

    cumulative = {
        phase: sum(
            cumulative_s  # entry[4]: caller → (calls, primitive calls, own time, cumulative time)
            for function, entry in stats.items()
            if in_phase(function, functions)
            for caller, (*_, cumulative_s) in entry[4].items()
            if not in_phase(caller, functions)
        )
        for phase, functions in PROFILE_FUNCTIONS.items()
    }
    seconds = {
        "projections": cumulative["projections"],
        "search": cumulative["search"],
        "gather_copy": cumulative["layer_search"] - cumulative["search"] - cumulative["lrfu_reference"],
        "lrfu_reference": cumulative["lrfu_reference"],
        "weighted_sum": cumulative["weighted_sum"],
        "insert": cumulative["insert"],
        "backward": cumulative["backward"],
        "value_update": cumulative["value_update"],
    }
    seconds["other"] = max(total - sum(seconds.values()), 0.0)
    fractions = {phase: value / total for phase, value in seconds.items()}
    return {
        "total_s": total,
        "seconds": seconds,
        "fractions": fractions,
        "dominant": max(fractions, key=fractions.__getitem__),
    }
