"""Layers swapped in for a transformer MLP: kNN memory layers and the dense baselines they face."""

from torch import nn

from dmt.layers.associative import AssociativeMemory
from dmt.layers.base import MemoryLayer
from dmt.layers.baselines import BaselineLayer, LowRankMLP, RemovedMLP, build_baseline
from dmt.layers.config import BASELINE_TYPES, LAYER_TYPES, MEMORY_TYPES, MemoryLayerConfig
from dmt.layers.featural import FeaturalMemory

LAYER_CLASSES: dict[str, type[MemoryLayer]] = {"featural": FeaturalMemory, "associative": AssociativeMemory}
# What a block's MLP can be swapped for: a memory layer or a dense baseline.
SWAPPED_CLASSES: tuple[type[nn.Module], ...] = (MemoryLayer, BaselineLayer)


def build_memory_layer(d_model: int, cfg: MemoryLayerConfig, store=None) -> MemoryLayer:
    """A memory layer of ``cfg.type`` for a residual stream of width ``d_model``."""
    if cfg.type not in LAYER_CLASSES:
        raise ValueError(f"memory.type: {cfg.type!r} is not a memory layer; use build_baseline")
    return LAYER_CLASSES[cfg.type](d_model, cfg, store)


__all__ = [
    "BASELINE_TYPES",
    "LAYER_CLASSES",
    "LAYER_TYPES",
    "MEMORY_TYPES",
    "SWAPPED_CLASSES",
    "AssociativeMemory",
    "BaselineLayer",
    "FeaturalMemory",
    "LowRankMLP",
    "MemoryLayer",
    "MemoryLayerConfig",
    "RemovedMLP",
    "build_baseline",
    "build_memory_layer",
]
