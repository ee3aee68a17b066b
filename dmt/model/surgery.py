"""Model surgery: clone a teacher into a student and swap chosen MLPs for memory layers (or baselines)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from dmt.layers import (
    SWAPPED_CLASSES,
    FeaturalMemory,
    MemoryLayer,
    MemoryLayerConfig,
    build_baseline,
    build_memory_layer,
)
from dmt.memory import KNNStore
from dmt.model.families import family_of, get_mlp, set_mlp

# Keys of the ``memory`` config group that choose layers rather than configure them.
SELECTION_KEYS = ("layers", "type", "per_layer")


def resolve_layer_indices(layers: Any, num_layers: int) -> list[int]:
    """Indices chosen by ``memory.layers``: ``all``, ``none``, a slice ``"a:b"`` or a list of ints.

    Negative indices count from the top, as in Python (``"-4:"`` is the upper four blocks).
    """
    if layers in (None, "none"):
        return []
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        try:
            parts = [int(p) if p.strip() else None for p in layers.split(":")]
        except ValueError:
            raise ValueError(
                f"memory.layers: cannot read {layers!r}; use all, none, 'a:b' or a list"
            ) from None
        if len(parts) != 2:
            raise ValueError(f"memory.layers: {layers!r} is not a slice 'a:b'")
        return list(range(num_layers))[slice(*parts)]
    if isinstance(layers, int):
        layers = [layers]
    indices = []
    for index in layers:
        if not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(
                f"memory.layers: layer {index!r} does not exist; the teacher has {num_layers} blocks"
            )
        indices.append(index % num_layers)
    if len(set(indices)) != len(indices):
        raise ValueError(f"memory.layers: {list(layers)} names a layer twice")
    return sorted(indices)


def _layer_type(types: Any, position: int, index: int, indices: list[int], num_layers: int) -> str:
    """One type for every layer (``featural``, ``associative``, or a baseline: ``removed``, ``lowrank``),
    ``mixed`` (featural in the lower half of the model, associative in the upper half) or a list aligned
    with ``memory.layers``."""
    if isinstance(types, str):
        if types == "mixed":
            return "featural" if index < num_layers // 2 else "associative"
        return types
    types = list(types)
    if len(types) != len(indices):
        raise ValueError(f"memory.type: {len(types)} types given for {len(indices)} layers {indices}")
    return types[position]


def resolve_layer_configs(memory_cfg: Mapping[str, Any], num_layers: int) -> dict[int, MemoryLayerConfig]:
    """One validated :class:`MemoryLayerConfig` per chosen block index.

    ``memory.per_layer`` maps a block index to settings that override the shared ones for that block.
    """
    memory_cfg = dict(memory_cfg)
    indices = resolve_layer_indices(memory_cfg.get("layers"), num_layers)
    shared = {k: v for k, v in memory_cfg.items() if k not in SELECTION_KEYS}
    per_layer = {int(k) % num_layers: dict(v) for k, v in (memory_cfg.get("per_layer") or {}).items()}
    stray = sorted(set(per_layer) - set(indices))
    if stray:
        raise ValueError(f"memory.per_layer: layers {stray} are not among memory.layers {indices}")
    configs = {}
    for position, index in enumerate(indices):
        layer_type = _layer_type(memory_cfg.get("type", "featural"), position, index, indices, num_layers)
        configs[index] = MemoryLayerConfig.from_dict(
            {**shared, "type": layer_type, **per_layer.get(index, {})}
        )
    return configs


def build_student(
    teacher: PreTrainedModel, layer_configs: Mapping[int, MemoryLayerConfig]
) -> PreTrainedModel:
    """Deep-copy ``teacher`` (left untouched: no shared parameters) and swap the chosen MLPs."""
    student = copy.deepcopy(teacher)
    student.train().requires_grad_(True)
    return attach_memory_layers(student, layer_configs)


def attach_memory_layers(
    model: PreTrainedModel,
    layer_configs: Mapping[int, MemoryLayerConfig],
    stores: Mapping[int, KNNStore] | None = None,
) -> PreTrainedModel:
    """Replace the MLP of each chosen block of ``model``, in place, with a memory layer or a baseline.

    ``stores`` supplies saved stores (on load); otherwise new ones are created and, for ``init: ffn``,
    seeded from the MLP being replaced. Baselines take their form (and, for ``init: ffn``, their starting
    weights) from the MLP they replace; on load that is the freshly built model's MLP, and the saved
    weights are loaded over it afterwards.
    """
    family = family_of(model.config)
    num_layers = len(family.blocks(model))
    device = next(model.parameters()).device
    d_model = model.config.hidden_size
    for index, cfg in sorted(layer_configs.items()):
        if not 0 <= index < num_layers:
            raise ValueError(
                f"memory.layers: layer {index} does not exist; the model has {num_layers} blocks"
            )
        store = (stores or {}).get(index)
        layer: nn.Module
        if not cfg.has_store:
            layer = build_baseline(d_model, cfg, family.ffn_weights(get_mlp(model, index)))
        else:
            layer = build_memory_layer(d_model, cfg, store)
            if store is None and cfg.init == "ffn":
                assert isinstance(layer, FeaturalMemory)
                ffn = family.ffn_weights(get_mlp(model, index))
                layer.init_from_ffn(ffn.keys, ffn.key_bias, ffn.values, ffn.out_bias, ffn.gate_keys)
        set_mlp(model, index, layer.to(device))
    return model


def swapped_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The layers swapped in for MLPs (memory layers and baselines), by block index; each has ``.cfg``."""
    family = family_of(model.config)
    return {
        index: mlp
        for index, block in enumerate(family.blocks(model))
        if isinstance(mlp := getattr(block, family.mlp_attr), SWAPPED_CLASSES)
    }


def memory_layers(model: nn.Module) -> dict[int, MemoryLayer]:
    """The memory layers (those with a kNN store) of a student, by block index."""
    return {i: layer for i, layer in swapped_layers(model).items() if isinstance(layer, MemoryLayer)}


def count_parameters(model: nn.Module) -> int:
    """Dense parameters (tied weights counted once); memory entries are not parameters."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def trainable_parameters(model: nn.Module) -> int:
    """Dense parameters that receive gradients (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


def memory_entries(model: nn.Module) -> int:
    """Entries stored across all memory layers."""
    return sum(len(layer.store) for layer in memory_layers(model).values())
