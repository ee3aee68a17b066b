"""Layers swapped in for a transformer MLP: kNN memory layers and the dense baselines they face."""

from torch import nn

from dmt.layers.associative import AssociativeMemory
from dmt.layers.base import MemoryLayer
from dmt.layers.baselines import LowRankMLP, RemovedMLP, build_baseline, matched_rank
from dmt.layers.config import (
    LAYER_TYPES,
    AssociativeConfig,
    FeaturalConfig,
    LayerConfig,
    LowRankConfig,
    MemoryConfig,
    RemovedConfig,
    config_class,
    layer_config,
)
from dmt.layers.featural import FeaturalMemory
from dmt.layers.mlp import FFNWeights, MLPForm
from dmt.layers.protocol import MemoryProtocol
from dmt.layers.resolve import resolve, resolve_baseline

LAYER_CLASSES: dict[str, type[MemoryLayer]] = {"featural": FeaturalMemory, "associative": AssociativeMemory}
# What a block's MLP can be swapped for: a memory layer or a dense baseline.
SWAPPED_CLASSES: tuple[type[nn.Module], ...] = (MemoryLayer, RemovedMLP, LowRankMLP)


def build_memory_layer(
    d_model: int, cfg: MemoryConfig, store=None, mlp: MLPForm | None = None
) -> MemoryLayer:
    """A memory layer of ``cfg.type`` for a residual stream of width ``d_model``; settings left to derive
    are resolved first (from ``mlp``, the form of the MLP it replaces, with ``init: ffn``)."""
    if cfg.type not in LAYER_CLASSES:
        raise ValueError(f"swap.type: {cfg.type!r} is not a memory layer; use build_baseline")
    return LAYER_CLASSES[cfg.type](d_model, resolve(cfg, d_model, mlp), store)


__all__ = [
    "LAYER_CLASSES",
    "LAYER_TYPES",
    "SWAPPED_CLASSES",
    "AssociativeConfig",
    "AssociativeMemory",
    "FFNWeights",
    "FeaturalConfig",
    "FeaturalMemory",
    "LayerConfig",
    "LowRankConfig",
    "LowRankMLP",
    "MLPForm",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryProtocol",
    "RemovedConfig",
    "RemovedMLP",
    "build_baseline",
    "build_memory_layer",
    "config_class",
    "layer_config",
    "matched_rank",
    "resolve",
    "resolve_baseline",
]
