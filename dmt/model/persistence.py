"""Saving and loading students: export directories, Lightning checkpoints, and the memory inside both.

Every way a student is written or read lives here: :func:`save_pretrained` / :func:`load_pretrained` for
export directories, :func:`memory_state` / :func:`restore_memory_state` for the stores inside a
checkpoint, :func:`student_from_checkpoint` to rebuild a student from one, :func:`load_student` for either,
and :func:`export_checkpoint` from one to the other.

An export directory holds::

    config.json, generation_config.json   the base model's Hugging Face config
    model.safetensors                     every dense weight of the student (memory layers included)
    tokenizer files                       as written by ``tokenizer.save_pretrained``
    dmt_config.json                       format version and the settings of each swapped layer per block
                                          (memory layers and baselines)
    memory/layer_XX/                      one store per memory layer (manifest + .npy arrays + index)

Nothing here unpickles: weights are safetensors, settings JSON, stores ``.npy`` read without pickle, and
checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from dmt.layers import LayerConfig, layer_config
from dmt.memory import KNNStore
from dmt.model.loading import load_tokenizer
from dmt.model.surgery import attach_memory_layers, memory_layers, swapped_layers

# 2: per-type layer settings (gate_dim, ranking, dense_weights) and gate_query_proj weights.
FORMAT_VERSION = 2
DMT_CONFIG = "dmt_config.json"
WEIGHTS = "model.safetensors"
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


def layer_configs_from_spec(spec: dict[str, Any]) -> dict[int, LayerConfig]:
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{DMT_CONFIG}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
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


def _replace_directory(tmp: Path, target: Path) -> None:
    """Move a fully written ``tmp`` to ``target``; an existing ``target`` is replaced only afterwards."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
    os.replace(tmp, target)
    if backup is not None:
        shutil.rmtree(backup)


def save_pretrained(model: PreTrainedModel, tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write an export directory (see module docstring); written aside then moved into place."""
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / DMT_CONFIG).write_text(json.dumps(memory_spec(model), indent=2))
        for index, layer in memory_layers(model).items():
            layer.store.save(tmp / "memory" / f"layer_{index:02d}")
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_pretrained(
    directory: str | os.PathLike, *, mmap: bool = False, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """Load an export directory: ``(model in eval mode, tokenizer or None)``.

    With ``mmap=True`` store values stay on disk, memory-mapped.
    """
    directory = Path(directory)
    if not (directory / DMT_CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory / DMT_CONFIG} not found: {directory} is not a dmt export directory"
        )
    spec = json.loads((directory / DMT_CONFIG).read_text())
    configs = layer_configs_from_spec(spec)
    stores = {
        i: KNNStore.load(directory / "memory" / f"layer_{i:02d}", mmap=mmap)
        for i, cfg in configs.items()
        if cfg.has_store
    }
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    attach_memory_layers(model, configs, stores)
    missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS}: missing keys {missing}, unexpected keys {unexpected}")
    tokenizer = (
        AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").exists() else None
    )
    return model.to(device).eval(), tokenizer


# -- Lightning checkpoints -----------------------------------------------------------------------------


def _model_config(config_dict: dict[str, Any]) -> PretrainedConfig:
    """A ``transformers`` config from ``PretrainedConfig.to_dict()`` output, without any hub access."""
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"checkpoint model_config: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(dict(config_dict))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A dmt Lightning checkpoint read with ``torch.load(weights_only=True)`` (nothing is unpickled)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the payload
        raise ValueError(f"{path}: cannot be read as a weights-only checkpoint: {err}") from err
    for key in ("state_dict", "dmt"):
        if key not in checkpoint:
            raise ValueError(f"{path}: not a dmt checkpoint (no {key!r} entry)")
    return checkpoint


def student_from_checkpoint(checkpoint: dict[str, Any], where: str = "checkpoint") -> PreTrainedModel:
    """Rebuild the student of a loaded Lightning checkpoint dict, in eval mode.

    Keys of ``state_dict`` outside ``student.*`` (the frozen teacher's) are ignored; within it the load is
    strict and a mismatch raises ``ValueError`` naming the missing and unexpected keys.
    """
    dmt = checkpoint["dmt"]
    model = AutoModelForCausalLM.from_config(_model_config(dmt["model_config"]))
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


def _checkpoint_tokenizer(checkpoint: dict[str, Any]) -> PreTrainedTokenizerBase | None:
    """The run's teacher tokenizer, or ``None`` if the checkpoint records no run config."""
    run_config = (checkpoint.get("hyper_parameters") or {}).get("run_config")
    if not run_config or not run_config.get("teacher"):
        return None
    return load_tokenizer(OmegaConf.create(run_config["teacher"]))


def load_student(path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """``(student in eval mode, tokenizer or None)`` from an export directory or a ``.ckpt`` file."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"student not found: {path}")
    checkpoint = read_checkpoint(path)
    return student_from_checkpoint(checkpoint, str(path)), _checkpoint_tokenizer(checkpoint)


def export_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the student of a Lightning checkpoint as an export directory; returns its resolved path."""
    model, tokenizer = load_student(ckpt)
    return save_pretrained(model, tokenizer, out_dir)
