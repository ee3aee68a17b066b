"""The student inside a Lightning checkpoint: its layer settings, its memory, and rebuilding it.

A dmt checkpoint holds, beside Lightning's own entries, ``checkpoint["dmt"]``: the student's model config,
its swapped layers' settings (:func:`memory_spec`), every store's state (:func:`memory_state`, tensors and
plain values, so ``torch.load(weights_only=True)`` reads it) and their digest. Nothing here unpickles.
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
from dmt.model.loading import load_tokenizer, model_config_from_dict
from dmt.model.surgery import attach_memory_layers, memory_layers, swapped_layers

# Version of the layer settings in a checkpoint's ``dmt`` entry (per-type settings such as gate_dim, ranking
# and dense_weights, and the gate_query_proj weights), raised whenever their layout changes.
FORMAT_VERSION = 2
STUDENT_PREFIX = "student."


def layer_configs_of(model: PreTrainedModel) -> dict[int, LayerConfig]:
    """Settings of every swapped layer (memory layers and baselines), by block index."""
    return {index: layer.cfg for index, layer in swapped_layers(model).items()}


def memory_spec(model: PreTrainedModel) -> dict[str, Any]:
    """JSON-ready description of a student's swapped layers (memory layers and baselines)."""
    return {
        "format_version": FORMAT_VERSION,
        "layers": {str(i): cfg.to_dict() for i, cfg in layer_configs_of(model).items()},
    }


def layer_configs_from_spec(
    spec: dict[str, Any], expected: int = FORMAT_VERSION, where: str = "checkpoint['dmt']['memory_spec']"
) -> dict[int, LayerConfig]:
    """The layer settings of :func:`memory_spec` output (or an export's ``dmt`` section), by block index;
    a ``ValueError`` naming ``where`` for another format version."""
    version = spec.get("format_version")
    if version != expected:
        raise ValueError(f"{where}: format_version {version!r} is not supported (expected {expected})")
    return {int(i): layer_config(cfg) for i, cfg in spec["layers"].items()}


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
    digest = hashlib.sha256()
    for index, layer in sorted(memory_layers(model).items()):
        digest.update(str(index).encode())
        for name, value in sorted(layer.store.state_dict().items()):
            digest.update(name.encode())
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
    return checkpoint


def student_from_checkpoint(checkpoint: dict[str, Any], where: str = "checkpoint") -> PreTrainedModel:
    """Rebuild the student of a loaded Lightning checkpoint dict, in eval mode.

    Keys of ``state_dict`` outside ``student.*`` (the frozen teacher's) are ignored; within it the load is
    strict and a mismatch raises ``ValueError`` naming the missing and unexpected keys.
    """
    dmt = checkpoint["dmt"]
    model = AutoModelForCausalLM.from_config(model_config_from_dict(dmt["model_config"]))
    # The checkpoint's stores go in directly: no fresh store is built or seeded (init: ffn) to be replaced.
    attach_memory_layers(
        model, layer_configs_from_spec(dmt["memory_spec"]), stores=stores_from_state(dmt["memory_state"])
    )
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
