"""Saving and loading students as export directories, and loading a student from either kind of file.

:func:`save_pretrained` / :func:`load_pretrained` for export directories, :func:`load_student` for an
export or a Lightning checkpoint (:mod:`dmt.model.checkpoint` reads those), and :func:`export_checkpoint`
from one to the other.

An export directory is a Hugging Face custom-code model: ``AutoModelForCausalLM.from_pretrained(export,
trust_remote_code=True)`` loads it with plain ``transformers`` (the code is :mod:`dmt.kernel`, copied in),
and ``AutoTokenizer.from_pretrained(export)`` loads its tokenizer as any other (``config.json`` keeps
the base model's ``model_type``, so nothing asks to trust code). The weights are the ``dmt`` variant of
the weights file, which only the remote code asks for: without ``trust_remote_code`` the base model class
finds no ``model.safetensors`` and refuses to load, rather than returning the base model with random MLPs.
It holds::

    config.json                 the base model's config, ``auto_map``, and ``dmt``: the format version,
                                each swapped block's settings (``layers``, from its config dataclass), where
                                it goes (``blocks``: module path, store directory) and the replaced MLPs'
                                form (``mlp``), as :mod:`dmt.kernel.modeling_dmt` reads them
    generation_config.json, tokenizer files
    model.dmt.safetensors       every dense weight of the student (memory layers included)
    *.py                        the remote code: every file of :mod:`dmt.kernel`
    memory/layer_XX/            one store per memory layer (:mod:`dmt.memory.persistence`)

Nothing here unpickles: weights are safetensors, settings JSON, stores ``.npy`` read without pickle, and
checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dmt.errors import InputFileError
from dmt.files import check_directory_target, write_directory
from dmt.kernel import FILES as REMOTE_CODE_FILES
from dmt.kernel.configuration_dmt import CLASS_PREFIX
from dmt.kernel.modeling_dmt import EXPORT_FORMAT_VERSION, WEIGHTS_VARIANT
from dmt.layers import LayerConfig
from dmt.memory import KNNStore
from dmt.model.checkpoint import (
    checkpoint_tokenizer,
    layer_configs,
    layer_settings,
    read_checkpoint,
    student_from_checkpoint,
)
from dmt.model.families import mlp_form, mlp_path
from dmt.model.loading import model_config_from_dict
from dmt.model.surgery import attach_memory_layers, memory_layers, swapped_layers
from dmt.packs.reading import read_with, use_pack
from dmt.progress import progress_bar

CONFIG = "config.json"
WEIGHTS = f"model.{WEIGHTS_VARIANT}.safetensors"  # the file transformers' variant= names
# Keys of an export's config.json that are not the base model's.
EXPORT_KEYS = ("dmt", "auto_map", "architectures")


def export_block(model: PreTrainedModel, index: int, layer: nn.Module) -> dict[str, str]:
    """Where swapped block ``index`` goes in an export: the replaced MLP's module path and, for a memory
    layer, its store directory."""
    block = {"module": mlp_path(model, index)}
    if layer.cfg.has_store:
        block["store"] = f"memory/layer_{index:02d}"
    return block


def export_config(model: PreTrainedModel) -> dict[str, Any]:
    """``config.json`` of an export: the base config as a ``trust_remote_code`` model (module docstring)."""
    base = model.config.to_diff_dict()
    swapped = swapped_layers(model)
    return {
        **base,
        "architectures": [f"{CLASS_PREFIX}{type(model).__name__}"],
        "auto_map": {
            "AutoConfig": f"configuration_dmt.{CLASS_PREFIX}{type(model.config).__name__}",
            "AutoModelForCausalLM": f"modeling_dmt.{CLASS_PREFIX}{type(model).__name__}",
        },
        "dmt": {
            "format_version": EXPORT_FORMAT_VERSION,
            "layers": layer_settings(model),
            "blocks": {str(i): export_block(model, i, layer) for i, layer in swapped.items()},
            "mlp": asdict(mlp_form(model.config)),
        },
    }


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a dmt export, of any format (its ``config.json`` has a ``dmt`` section)."""
    try:
        return isinstance(json.loads((directory / CONFIG).read_text()).get("dmt"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(
    model: PreTrainedModel,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    force: bool = False,
    keep: Collection[str | os.PathLike] = (),
) -> Path:
    """Write an export directory (see module docstring); written aside then renamed into place.

    An existing ``directory`` is replaced when it holds a previous export; anything else non-empty is
    refused (:class:`dmt.errors.OutputExistsError`) unless ``force``, and one that holds a path of
    ``keep`` (the caller's inputs) or the current directory always. Returns the absolute directory.
    """
    target = Path(directory).absolute()
    check_export_target(target, force, keep)
    stores = memory_layers(model)

    def write(staging: Path) -> None:
        (staging / CONFIG).write_text(json.dumps(export_config(model), indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in REMOTE_CODE_FILES:
            (staging / name).write_bytes(resources.files("dmt.kernel").joinpath(name).read_bytes())
        with progress_bar(len(stores), "saving memory", unit="layer") as bar:
            for index, layer in stores.items():
                layer.store.save(staging / "memory" / f"layer_{index:02d}")
                bar.update()

    return write_directory(target, write)


def check_export_target(
    directory: str | os.PathLike, force: bool = False, keep: Collection[str | os.PathLike] = ()
) -> None:
    """Refuse ``directory`` as an export's place where writing would lose the user's files (see
    :func:`save_pretrained`); callers check before the work that produces the export."""
    check_directory_target(Path(directory), is_export, "dmt export", force, keep)


def read_export_config(directory: Path) -> tuple[PretrainedConfig, dict[int, LayerConfig]]:
    """The base model's config and the swapped layers' settings of the export ``directory``.

    Raises:
        FileNotFoundError: there is no ``config.json``.
        InputFileError: naming ``config.json`` when it is not JSON or not a dmt export's.
    """
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a model directory")
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise InputFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("dmt"), dict):
        raise InputFileError(f"{path}: not a dmt export (no 'dmt' section)")
    version = raw["dmt"].get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise InputFileError(
            f"{path}: export format {version!r} is not the one this dmt reads ({EXPORT_FORMAT_VERSION}); "
            "export the run's checkpoint again with dmt-export"
        )
    try:
        layers = layer_configs(raw["dmt"]["layers"])
        base = {key: value for key, value in raw.items() if key not in EXPORT_KEYS}
        return model_config_from_dict(base), layers
    except (KeyError, TypeError, ValueError) as err:
        raise InputFileError(f"{path}: {err}") from err


def load_pretrained(
    directory: str | os.PathLike,
    *,
    mmap: bool = False,
    device: str | torch.device = "cpu",
    memory: str | os.PathLike | None = None,
    memory_index: Mapping[str, Any] | None = None,
    memory_read: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load an export directory: ``(model in eval mode, tokenizer or None)``.

    With ``mmap=True`` store keys and values stay on disk, memory-mapped copy-on-write: the export's files
    are never changed by using the student (writes stay in memory). ``memory`` names a memory pack made for
    this student (``dmt-memorize``), whose entries replace the memory of the layers it holds
    (:func:`dmt.packs.use_pack`); a pack made for another student is refused, naming both.
    ``memory_index`` names the key index of the pack's stores (e.g. ``{"backend": "faiss"}``); None: each
    layer's own. ``memory_read``: reading settings over the saved ones (e.g. ``{"max_distance": 0.05}``,
    :func:`dmt.packs.reading.read_with`).
    """
    directory = Path(directory)
    config, configs = read_export_config(directory)
    stores = {
        i: KNNStore.load(directory / "memory" / f"layer_{i:02d}", mmap=mmap)
        for i, cfg in configs.items()
        if cfg.has_store
    }
    # The base model's weights are not allocated (their memory would not be given back after the swap):
    # every parameter is assigned from the weights file, buffers are built as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    attach_memory_layers(model, configs, stores)
    try:
        weights = load_file(directory / WEIGHTS)
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise InputFileError(f"{directory / WEIGHTS}: not a readable safetensors file ({err})") from err
    unexpected = sorted(set(weights) - set(model.state_dict()))
    # A tied weight (GPT-2's lm_head and wte) is saved once, under one of its names: give it every name.
    # Ties are the model's shared parameters, or (transformers 5, not yet tied here) its tied-keys map.
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    tied_keys = getattr(model, "_tied_weights_keys", None)
    groups = [*tied.values(), *(tied_keys.items() if isinstance(tied_keys, dict) else ())]
    for names in groups:
        saved = [name for name in names if name in weights]
        for name in names if saved else ():
            weights.setdefault(name, weights[saved[0]])
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # the same parameter again, not two sharing storage
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing or unexpected:
        raise InputFileError(f"{directory / WEIGHTS}: missing keys {missing}, unexpected keys {unexpected}")
    # Given the base config, the tokenizer does not read config.json (whose auto_map would ask to trust
    # the remote code).
    tokenizer = (
        AutoTokenizer.from_pretrained(directory, config=config)
        if (directory / "tokenizer_config.json").exists()
        else None
    )
    if memory is not None:
        use_pack(model, memory, str(directory), index=memory_index)
    read_with(model, memory_read)
    return model.to(device).eval(), tokenizer


def check_student_path(student: str | os.PathLike) -> None:
    """Refuse a student path that does not exist, naming the setting, before any model is loaded."""
    if not Path(student).exists():
        raise FileNotFoundError(f"student={student}: no such export directory or .ckpt file")


def load_student(
    path: str | os.PathLike,
    memory: str | os.PathLike | None = None,
    memory_index: Mapping[str, Any] | None = None,
    memory_read: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """``(student in eval mode, tokenizer or None)`` from an export directory or a ``.ckpt`` file, with
    the memory pack ``memory`` in place of its memory when given, its stores on the key index
    ``memory_index``, read with the reading settings ``memory_read`` (:func:`load_pretrained`)."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path, memory=memory, memory_index=memory_index, memory_read=memory_read)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: student not found (give an export directory or a .ckpt file)")
    checkpoint = read_checkpoint(path)
    student = student_from_checkpoint(checkpoint, str(path))
    if memory is not None:
        use_pack(student, memory, str(path), index=memory_index)
    read_with(student, memory_read)
    return student, checkpoint_tokenizer(checkpoint)


def cast_memory_values(model: PreTrainedModel, value_dtype: str) -> None:
    """Hold every store's values in ``value_dtype`` (``float16`` halves them), the layers' settings too,
    so that an export written afterwards says what it holds."""
    for layer in memory_layers(model).values():
        layer.store.cast_values(value_dtype)
        layer.cfg = replace(layer.cfg, value_dtype=value_dtype)


def export_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    value_dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write the student of a Lightning checkpoint as an export directory; returns its absolute path.

    ``value_dtype`` (e.g. ``float16``) stores the memory's values in that dtype instead of the run's.
    ``out_dir`` is checked before the checkpoint is read (:func:`save_pretrained` says what is refused).
    """
    check_export_target(out_dir, force, keep=[ckpt])
    model, tokenizer = load_student(ckpt)
    if value_dtype is not None:
        cast_memory_values(model, value_dtype)
    return save_pretrained(model, tokenizer, out_dir, force=force, keep=[ckpt])
