"""Memory layers: drop-in replacements for a transformer MLP backed by a kNN store."""

from dmt.layers.associative import AssociativeMemory
from dmt.layers.base import MemoryLayer
from dmt.layers.config import LAYER_TYPES, MemoryLayerConfig
from dmt.layers.featural import FeaturalMemory

LAYER_CLASSES: dict[str, type[MemoryLayer]] = {"featural": FeaturalMemory, "associative": AssociativeMemory}


def build_memory_layer(d_model: int, cfg: MemoryLayerConfig, store=None) -> MemoryLayer:
    """A memory layer of ``cfg.type`` for a residual stream of width ``d_model``."""
    return LAYER_CLASSES[cfg.type](d_model, cfg, store)


__all__ = [
    "LAYER_CLASSES",
    "LAYER_TYPES",
    "AssociativeMemory",
    "FeaturalMemory",
    "MemoryLayer",
    "MemoryLayerConfig",
    "build_memory_layer",
]
