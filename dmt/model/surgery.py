"""Model surgery: clone a teacher into a student and swap chosen MLPs for memory layers (or baselines)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dmt.layers import (
    SWAPPED_CLASSES,
    AssociativeMemory,
    FeaturalConfig,
    LayerConfig,
    MemoryLayer,
    MemoryProtocol,
    build_baseline,
    build_memory_layer,
    config_class,
    resolve,
    resolve_baseline,
)
from dmt.layers.config import CONFIG_CLASSES, SELECTION_KEYS, bad, settings_of
from dmt.layers.mlp import MLPForm
from dmt.layers.next_tokens import mix_next_tokens
from dmt.memory import KNNStore
from dmt.model.families import family_of, get_mlp, mlp_form, mlp_weights, num_blocks, set_mlp


def resolve_block_indices(blocks: Any, num_layers: int) -> list[int]:
    """Indices chosen by ``swap.blocks``: ``all``, ``none``, a slice ``"a:b"`` or a list of ints.

    Negative indices count from the top, as in Python (``"-4:"`` is the upper four blocks).
    """
    if blocks in (None, "none"):
        return []
    if blocks == "all":
        return list(range(num_layers))
    if isinstance(blocks, str):
        try:
            parts = [int(p) if p.strip() else None for p in blocks.split(":")]
        except ValueError:
            raise bad("blocks", f"cannot read {blocks!r}; use all, none, 'a:b' or a list") from None
        if len(parts) != 2:
            raise bad("blocks", f"{blocks!r} is not a slice 'a:b'")
        return list(range(num_layers))[slice(*parts)]
    if isinstance(blocks, int):
        blocks = [blocks]
    indices = []
    for index in blocks:
        if not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise bad("blocks", f"block {index!r} does not exist; the teacher has {num_layers} blocks")
        indices.append(index % num_layers)
    if len(set(indices)) != len(indices):
        raise bad("blocks", f"{list(blocks)} names a block twice")
    return sorted(indices)


def _layer_types(types: Any, indices: list[int], num_layers: int) -> list[str]:
    """One type for every block (``featural``, ``associative``, or a baseline: ``removed``, ``lowrank``),
    ``mixed`` (featural in the lower half of the model, associative in the upper half) or a list aligned
    with ``swap.blocks``."""
    if isinstance(types, str):
        if types == "mixed":
            return ["featural" if index < num_layers // 2 else "associative" for index in indices]
        return [types] * len(indices)
    types = list(types)
    if len(types) != len(indices):
        raise bad("type", f"{len(types)} types given for {len(indices)} blocks {indices}")
    return types


def _layer_config(
    layer_type: str, settings: dict[str, Any], shared: set[str], others: list[frozenset[str]], mlp: MLPForm
) -> LayerConfig:
    """The resolved config of one block from its ``settings``.

    A memory layer refuses a setting it does not have unless it is ``shared`` by the group and another
    type of this plan (``others``) has it. A baseline reads the memory settings beside its own as the
    memory layer it stands against: validated alike, and sizing ``lowrank`` with ``rank: null``.
    """
    cls = config_class(layer_type)
    own = {key: value for key, value in settings.items() if key in cls.setting_names()}
    foreign = sorted(set(settings) - cls.setting_names())
    if cls.has_store:
        refused = [key for key in foreign if key not in shared or not any(key in o for o in others)]
        if refused:
            raise bad(refused[0], f"not a setting of {layer_type} layers; they have {settings_of(cls)}")
        return resolve(cls(**own), mlp.d_model, mlp)
    unknown = sorted(set(foreign) - FeaturalConfig.setting_names())
    if unknown:
        raise bad(
            unknown[0], f"not a setting of {layer_type} layers or of the memory layers they stand against"
        )
    memory = FeaturalConfig(**{k: v for k, v in settings.items() if k in FeaturalConfig.setting_names()})
    return resolve_baseline(cls(**own), memory, mlp)


def resolve_layer_configs(
    swap_cfg: Mapping[str, Any], model_config: PretrainedConfig
) -> dict[int, LayerConfig]:
    """One resolved, validated layer config per chosen block index, from the flat plan of the ``swap`` group
    (:func:`dmt.layers.swap.swap_settings` makes it from the nested Hydra form).

    ``swap.per_block`` maps a block index to settings that override the shared ones for that block.
    Settings a layer takes from the MLP it replaces (``init: ffn``) are derived from ``model_config``.
    """
    swap_cfg = dict(swap_cfg)
    num_layers = model_config.num_hidden_layers
    mlp = mlp_form(model_config)
    indices = resolve_block_indices(swap_cfg.get("blocks"), num_layers)
    shared = {k: v for k, v in swap_cfg.items() if k not in SELECTION_KEYS}
    per_block = {int(k) % num_layers: dict(v) for k, v in (swap_cfg.get("per_block") or {}).items()}
    stray = sorted(set(per_block) - set(indices))
    if stray:
        raise bad("per_block", f"blocks {stray} are not among swap.blocks {indices}")
    types = _layer_types(swap_cfg.get("type", "featural"), indices, num_layers)
    known = set().union(*(cls.setting_names() for cls in CONFIG_CLASSES.values()))
    unknown = sorted(set(shared) - known)
    if unknown:
        raise bad(unknown[0], f"unknown layer setting; known: {sorted(known)}")
    configs = {}
    for index, layer_type in zip(indices, types, strict=True):
        others = [config_class(t).setting_names() for t in set(types) - {layer_type}]
        settings = {**shared, **per_block.get(index, {})}
        configs[index] = _layer_config(layer_type, settings, set(shared), others, mlp)
    return configs


def build_student(teacher: PreTrainedModel, layer_configs: Mapping[int, LayerConfig]) -> PreTrainedModel:
    """Deep-copy ``teacher`` (left untouched: no shared parameters) and swap the chosen MLPs."""
    student = copy.deepcopy(teacher)
    student.train().requires_grad_(True)
    return attach_memory_layers(student, layer_configs)


def attach_memory_layers(
    model: PreTrainedModel,
    layer_configs: Mapping[int, LayerConfig],
    stores: Mapping[int, KNNStore] | None = None,
) -> PreTrainedModel:
    """Replace the MLP of each chosen block of ``model``, in place, with a memory layer or a baseline.

    ``stores`` supplies saved stores (on load); otherwise new ones are created and, for ``init: ffn``,
    seeded from the MLP being replaced. Baselines take their form (and, for ``init: ffn`` when not
    loading, their starting weights) from the MLP they replace; on load (``stores`` given, even empty) the
    saved weights are loaded over them afterwards, so the model's MLPs may be unallocated (meta). An
    associative layer with ``keep_mlp`` takes the block's MLP inside it; one that inserts ``next_token``
    values is given the model's input embeddings.
    """
    num_layers = num_blocks(model)
    device = next(model.parameters()).device
    form = mlp_form(model.config)
    for index, cfg in sorted(layer_configs.items()):
        if not 0 <= index < num_layers:
            raise bad("blocks", f"block {index} does not exist; the model has {num_layers} blocks")
        store = (stores or {}).get(index)
        layer: nn.Module
        if not cfg.has_store:
            layer = build_baseline(form.d_model, cfg, mlp_weights(model, index), seed=stores is None)
        else:
            layer = build_memory_layer(form.d_model, cfg, store, mlp=form)
            if store is None and layer.cfg.init == "ffn":
                layer.init_from_ffn(mlp_weights(model, index))
            if isinstance(layer, AssociativeMemory) and layer.cfg.keep_mlp:
                layer.keep(get_mlp(model, index))
        set_mlp(model, index, layer.to(device))
    if not getattr(model, "_dmt_next_token_hook", False):
        model.register_forward_hook(mix_next_token_reads, with_kwargs=True)
        model._dmt_next_token_hook = True
    return model


def mix_next_token_reads(
    model: PreTrainedModel, _args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """A forward hook on a student: its associative layers' next-token reads of this forward
    (``next_token_weight``) mixed into the logits (:func:`~dmt.layers.next_tokens.mix_next_tokens`), and
    the loss of given ``labels`` computed again from the mixture. Nothing changes without a read."""
    reads = [
        read
        for layer in memory_layers(model).values()
        if isinstance(layer, AssociativeMemory) and (read := layer.take_next_token_read()) is not None
    ]
    if not reads:
        return None
    if not hasattr(output, "logits"):
        raise TypeError("next_token_weight: the student's forward must return logits (return_dict=True)")
    output.logits = mix_next_tokens(output.logits, reads)  # (B, T, V) log-probabilities
    if kwargs.get("labels") is not None:
        output.loss = model.loss_function(output.logits, kwargs["labels"], model.config.vocab_size)
    return output


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


def memory_protocol(model: PreTrainedModel, deferred: bool = False) -> MemoryProtocol:
    """How the code that runs ``model`` talks to its memory layers (:mod:`dmt.layers.protocol`)."""
    return MemoryProtocol(memory_layers(model), model.get_input_embeddings(), deferred=deferred)


def count_parameters(model: nn.Module) -> int:
    """Dense parameters (tied weights counted once); memory entries are not parameters."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def trainable_parameters(model: nn.Module) -> int:
    """Dense parameters that receive gradients (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


def memory_entries(model: nn.Module) -> int:
    """Entries stored across all memory layers."""
    return sum(len(layer.store) for layer in memory_layers(model).values())
