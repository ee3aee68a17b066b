"""The student inside a Lightning checkpoint: its layer settings, its memory, and rebuilding it.

A dmt checkpoint holds, beside Lightning's own entries, ``checkpoint["dmt"]`` (:func:`checkpoint_entry`):
its ``format_version``, the student's model config, its swapped layers' settings (:func:`layer_settings`),
every store's state (:func:`memory_state`, tensors and plain values, so ``torch.load(weights_only=True)``
reads it) and their digest. The one version covers the whole entry, the stores' states included: only
the current layout is read. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dmt.errors import InputFileError
from dmt.layers import LayerConfig, layer_config
from dmt.memory import KNNStore
from dmt.memory.backends import own_index_settings
from dmt.model.loading import load_tokenizer, model_config_from_dict
from dmt.model.surgery import attach_memory_layers, memory_layers, swapped_layers

# The layout of a checkpoint's ``dmt`` entry, raised whenever it changes.
CHECKPOINT_FORMAT_VERSION = 3
# The layout before it, still read (current_entry) so that a run's checkpoints outlive the change and can
# be exported again: the layer settings under ``memory_spec`` with a version of their own (2) and every
# backend's index settings, and each store's state with a version of its own (3).
PREVIOUS_SPEC_VERSION, PREVIOUS_STATE_VERSION = 2, 3
STUDENT_PREFIX = "student."


def layer_configs_of(model: PreTrainedModel) -> dict[int, LayerConfig]:
    """Settings of every swapped layer (memory layers and baselines), by block index."""
    return {index: layer.cfg for index, layer in swapped_layers(model).items()}


def layer_settings(model: PreTrainedModel) -> dict[str, dict[str, Any]]:
    """JSON-ready settings of a student's swapped layers (memory layers and baselines), by block index: the
    ``to_dict()`` of each layer's config dataclass, as checkpoints and exports hold them."""
    return {str(i): cfg.to_dict() for i, cfg in layer_configs_of(model).items()}


def layer_configs(settings: dict[str, Any]) -> dict[int, LayerConfig]:
    """The layer configs of :func:`layer_settings` output, by block index."""
    return {int(i): layer_config(cfg) for i, cfg in settings.items()}


def checkpoint_entry(model: PreTrainedModel, **run: Any) -> dict[str, Any]:
    """``checkpoint["dmt"]`` for the student ``model``, with the training loop's own ``run`` entries
    (``global_step``, ``tokens_seen``)."""
    memory = memory_state(model)  # the stores captured once: the digest is of these very states
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "layers": layer_settings(model),
        "memory_state": memory,
        "memory_digest": state_digest(memory),
        **run,
    }


def current_entry(entry: Any, where: str) -> dict[str, Any]:
    """``checkpoint["dmt"]`` in the current layout: as it is, or converted from the previous one (see
    :data:`PREVIOUS_SPEC_VERSION`) after checking its memory against the digest saved with it.

    Raises:
        InputFileError: naming ``where``, for any other layout or a memory that does not match its digest.
    """
    if isinstance(entry, dict) and entry.get("format_version") == CHECKPOINT_FORMAT_VERSION:
        return entry
    spec = entry.get("memory_spec") if isinstance(entry, dict) else None
    states = entry.get("memory_state") if isinstance(entry, dict) else None
    previous = (
        isinstance(spec, dict)
        and spec.get("format_version") == PREVIOUS_SPEC_VERSION
        and isinstance(states, dict)
        and all(state.get("format_version") == PREVIOUS_STATE_VERSION for state in states.values())
    )
    if not previous:
        version = entry.get("format_version") if isinstance(entry, dict) else None
        raise InputFileError(
            f"{where}: dmt checkpoint format {version!r} is not the one this dmt reads "
            f"({CHECKPOINT_FORMAT_VERSION}, or the one before it)"
        )
    if "memory_digest" in entry and state_digest(states) != entry["memory_digest"]:
        raise InputFileError(f"{where}: the memory does not match the digest saved with it")
    memory = {
        index: {k: v for k, v in state.items() if k != "format_version"} for index, state in states.items()
    }
    layers = {
        index: {**cfg, "index": own_index_settings(cfg["index"])} if "index" in cfg else cfg
        for index, cfg in spec["layers"].items()
    }
    run = {k: v for k, v in entry.items() if k not in ("memory_spec", "memory_state", "memory_digest")}
    return {
        **run,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "layers": layers,
        "memory_state": memory,
        "memory_digest": state_digest(memory),
    }


def memory_state(model: PreTrainedModel) -> dict[str, dict[str, Any]]:
    """Every store's state as tensors and plain values, for a checkpoint loadable with weights_only."""
    return {
        str(index): {
            k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in layer.store.state_dict().items()
        }
        for index, layer in memory_layers(model).items()
    }


def memory_digest(model: PreTrainedModel) -> str:
    """SHA-256 over every store's state (index graph included): equal digests, identical memory."""
    return state_digest(
        {str(index): layer.store.state_dict() for index, layer in memory_layers(model).items()}
    )


def state_digest(states: dict[str, dict[str, Any]]) -> str:
    """SHA-256 over stores' states by block index, arrays as numpy arrays or tensors (memory_state)."""
    digest = hashlib.sha256()
    for index in sorted(states, key=int):
        digest.update(str(index).encode())
        for name, value in sorted(states[index].items()):
            digest.update(name.encode())
            value = value.numpy() if isinstance(value, torch.Tensor) else value
            digest.update(
                np.ascontiguousarray(value).tobytes()
                if isinstance(value, np.ndarray)
                else repr(value).encode()
            )
    return digest.hexdigest()


def stores_from_state(state: dict[str, dict[str, Any]]) -> dict[int, KNNStore]:
    """The stores of a :func:`memory_state` dict, by block index."""
    return {
        int(index): KNNStore.from_state_dict(
            {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in store_state.items()}
        )
        for index, store_state in state.items()
    }


def restore_memory_state(model: PreTrainedModel, state: dict[str, dict[str, Any]]) -> None:
    """Put the stores of :func:`memory_state` back into the memory layers of ``model``."""
    layers = memory_layers(model)
    stores = stores_from_state(state)
    if sorted(stores) != sorted(layers):
        raise ValueError(f"checkpoint memory has layers {sorted(stores)}, the model {sorted(layers)}")
    for index, store in stores.items():
        layers[index].store = store


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A dmt Lightning checkpoint read with ``torch.load(weights_only=True)`` (nothing is unpickled).

    Raises:
        InputFileError: ``path`` is not a PyTorch checkpoint, holds objects a weights-only load refuses
            (so dmt did not write it), or lacks dmt's entries.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the payload
        # torch's own message advises weights_only=False, which would run the file's code: never passed on.
        reason = (
            "it holds Python objects that a safe, weights-only load refuses"
            if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err)
            else "not a PyTorch checkpoint file"
        )
        raise InputFileError(f"{path}: cannot be read as a dmt checkpoint: {reason}") from err
    if not isinstance(checkpoint, dict):
        raise InputFileError(f"{path}: not a dmt checkpoint (a {type(checkpoint).__name__}, not a dict)")
    for key in ("state_dict", "dmt"):
        if key not in checkpoint:
            raise InputFileError(f"{path}: not a dmt checkpoint (no {key!r} entry)")
    checkpoint["dmt"] = current_entry(checkpoint["dmt"], str(path))
    return checkpoint


def student_from_checkpoint(checkpoint: dict[str, Any], where: str = "checkpoint") -> PreTrainedModel:
    """Rebuild the student of a loaded Lightning checkpoint dict, in eval mode.

    Keys of ``state_dict`` outside ``student.*`` (the frozen teacher's) are ignored; within it the load is
    strict and a mismatch raises ``ValueError`` naming the missing and unexpected keys.
    """
    dmt = checkpoint["dmt"]
    model = AutoModelForCausalLM.from_config(model_config_from_dict(dmt["model_config"]))
    # The checkpoint's stores go in directly: no fresh store is built or seeded (init: ffn) to be replaced.
    attach_memory_layers(model, layer_configs(dmt["layers"]), stores=stores_from_state(dmt["memory_state"]))
    weights = {
        key[len(STUDENT_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(STUDENT_PREFIX)
    }
    if not weights:
        raise ValueError(f"{where}: state_dict has no '{STUDENT_PREFIX}*' key")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where}: student weights do not match the model rebuilt from checkpoint['dmt']: "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
        )
    return model.eval()


def checkpoint_tokenizer(checkpoint: dict[str, Any]) -> PreTrainedTokenizerBase | None:
    """The run's teacher tokenizer, or ``None`` if the checkpoint records no run config."""
    run_config = (checkpoint.get("hyper_parameters") or {}).get("run_config")
    if not run_config or not run_config.get("teacher"):
        return None
    return load_tokenizer(OmegaConf.create(run_config["teacher"]))
