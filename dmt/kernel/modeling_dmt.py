"""An exported dmt student for ``transformers`` auto classes (``trust_remote_code=True``), dmt not needed.

The student is its base model class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...), subclassed per base
on demand as ``DMT<BaseClass>`` (this module's ``__getattr__``, named by ``config.json``'s ``auto_map``),
with the MLPs of the blocks that ``config.dmt`` lists swapped for the modules of :mod:`.read`: a memory
layer reads the entries of its store (``memory/layer_XX/``, checked against its manifest by
:mod:`.store_files`), searched exactly, in torch, on the model's device. ``config.dmt`` holds:

- ``format_version``: the layout of an export, :data:`EXPORT_FORMAT_VERSION` (no other is read);
- ``layers``: each swapped block's settings, the ``to_dict()`` of its ``dmt.layers.config`` dataclass;
- ``blocks``: where each goes (``module``, the replaced MLP's path) and, for a memory layer, its ``store``;
- ``mlp``: the form of the replaced MLPs (``dmt.layers.mlp.MLPForm``), which a dense baseline takes.

Weight names are those of dmt's own student, so the weights file loads as it is; it is the ``dmt`` variant
(``model.dmt.safetensors``), which ``from_pretrained`` here asks for and the base class alone does not, so
that loading without ``trust_remote_code`` fails instead of returning the base model with random MLPs.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from .configuration_dmt import CLASS_PREFIX, student_config_class
from .pack_files import READING_SETTINGS, pack_entries, read_pack_json, stored_settings, weights_fingerprint
from .read import swapped_module
from .store_files import StoreFileError, read_store

# The export layout this code reads (dmt.model.persistence writes it).
EXPORT_FORMAT_VERSION = 5
# The weights file is model.<variant>.safetensors (transformers' `variant`).
WEIGHTS_VARIANT = "dmt"


class StudentMixin:
    """What a ``DMT<BaseClass>`` adds to its base model class: the swap and the memory."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        spec = getattr(config, "dmt", None)
        if not isinstance(spec, dict) or spec.get("format_version") != EXPORT_FORMAT_VERSION:
            version = spec.get("format_version") if isinstance(spec, dict) else None
            raise ValueError(
                f"config.json: dmt.format_version {version!r} is not supported "
                f"(expected {EXPORT_FORMAT_VERSION})"
            )
        for index, block in spec["blocks"].items():
            mlp = self.get_submodule(block["module"])
            module = swapped_module(config.hidden_size, spec["layers"][index], spec["mlp"], mlp)
            self.set_submodule(block["module"], module)

    def load_memory(self, directory: str | os.PathLike) -> None:
        """Read every memory layer's entries from the export ``directory`` (its ``memory/layer_XX``)."""
        for block in self.config.dmt["blocks"].values():
            if "store" in block:
                layer = self.get_submodule(block["module"])
                store = Path(directory) / block["store"]
                layer.load_entries(
                    *read_store(store, layer.key_dim, layer.value_dim + layer.gate_dim, layer.metric)
                )

    def load_pack(self, pack: str | os.PathLike, verify: bool = True) -> None:
        """Read the entries of the memory pack ``pack`` (``dmt-memorize``) into the layers it holds, in
        place of their memory. A pack made for another student (its weights' fingerprint) or with other
        layer settings is refused, naming both."""
        pack = Path(pack)
        raw = read_pack_json(pack)
        student = raw["student"]
        fingerprint = weights_fingerprint(self)
        if student["fingerprint"] != fingerprint:
            raise StoreFileError(
                f"pack {pack} was made for student {student['name']} (weights "
                f"{student['fingerprint'][:12]}), not this one (weights {fingerprint[:12]})"
            )
        for index, settings in raw["layers"].items():
            block = self.config.dmt["blocks"].get(index)
            here = self.config.dmt["layers"].get(index, {})
            if block is None or stored_settings(here) != stored_settings(settings):
                raise StoreFileError(f"pack {pack}: block {index} has other settings, or no memory, here")
            layer = self.get_submodule(block["module"])
            keys, entries, _ = pack_entries(
                pack, raw, index, layer.key_dim, layer.value_dim + layer.gate_dim, verify
            )
            layer.load_entries(keys, entries, torch.ones(len(keys), dtype=torch.bool))

    def read_with(self, settings: dict[str, Any]) -> None:
        """Give each memory layer the reading settings ``settings`` (e.g. ``{"max_distance": 0.05}``; any
        of :data:`READING_SETTINGS`) that it has, in place of its saved ones, in ``config.dmt`` too (a save
        keeps them); a featural layer has no ``max_distance``, and a student may mix the two. They weigh
        what a layer reads, not what it stores, so any pack of the student reads under them.

        Raises:
            ValueError: ``settings`` is not a dict, names another setting or one no memory layer has, or
                gives a value a layer refuses; the error names ``dmt_memory_read.<key>``. No layer changes
                then.
        """
        if not isinstance(settings, dict):
            raise ValueError(
                f"dmt_memory_read: expected a dict such as {{'max_distance': 0.05}}, got {settings!r}"
            )
        for key, value in settings.items():
            if (error := reading_error(key, value)) is not None:
                raise ValueError(f"dmt_memory_read.{key}: {error}")
        memories = {index: block for index, block in self.config.dmt["blocks"].items() if "store" in block}
        saved = {index: self.config.dmt["layers"][index] for index in memories}
        for key in settings:
            if not any(key in here for here in saved.values()):
                kinds = ", ".join(f"{here['type']} at block {index}" for index, here in saved.items())
                raise ValueError(f"dmt_memory_read.{key}: no memory layer of this model has {key} ({kinds})")
        for index, here in saved.items():
            if (
                "null_distance" in here
                and settings.get("null_distance") is not None
                and here["weighting"] != "softmax"
            ):
                raise ValueError(
                    f"dmt_memory_read.null_distance: a null entry takes weight in a softmax; block {index} "
                    f"weighs with {here['weighting']}"
                )
        for index, block in memories.items():
            own = {key: value for key, value in settings.items() if key in saved[index]}
            saved[index].update(own)
            layer = self.get_submodule(block["module"])
            for key, value in own.items():
                setattr(layer, key, value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """The base class's ``from_pretrained`` of the ``dmt`` weights variant, then the memory: from the
        export directory, or (a hub repository id) from its ``memory/`` files, downloaded like the weights;
        or, given ``dmt_memory=PACK``, from that memory pack (:meth:`load_pack`). ``dmt_memory_read``:
        reading settings in place of the saved ones (:meth:`read_with`)."""
        pack = kwargs.pop("dmt_memory", None)
        reading = kwargs.pop("dmt_memory_read", None)
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            hub_options = ("cache_dir", "revision", "token", "local_files_only", "force_download")
            directory = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    allow_patterns=["memory/*"],
                    **{key: kwargs[key] for key in hub_options if key in kwargs},
                )
            )
        model.load_memory(directory)
        if pack is not None:
            model.load_pack(pack)
        if reading is not None:
            model.read_with(reading)
        return model


def reading_error(key: str, value: Any) -> str | None:
    """What is wrong with the reading setting ``key: value`` (None: nothing)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key not in READING_SETTINGS:
        return f"not a reading setting; reading settings are {sorted(READING_SETTINGS)}"
    if key.startswith("next_token_"):
        return "next tokens mixed into the output are read by dmt.load_pretrained, not the transformers path"
    if key == "topk" and not (number and isinstance(value, int) and value >= 1):
        return f"must be an integer >= 1, got {value!r}"
    if key == "temperature" and not (number and value > 0):
        return f"must be a number > 0, got {value!r}"
    if key in ("null_distance", "max_distance") and not (value is None or number):
        return f"must be a number or None, got {value!r}"
    if key == "residual_distance_scale" and not (value is None or (number and value > 0)):
        return f"must be a number > 0 or None, got {value!r}"
    return None


@cache
def student_model_class(base_class_name: str) -> type[PreTrainedModel]:
    """``DMT<BaseClass>``: the causal-LM class of a student of the ``transformers`` class
    ``base_class_name`` (``LlamaForCausalLM``)."""
    base = getattr(transformers, base_class_name, None)
    if not (isinstance(base, type) and issubclass(base, PreTrainedModel)):
        raise AttributeError(f"transformers has no model class {base_class_name!r} to base a dmt student on")
    return type(
        f"{CLASS_PREFIX}{base.__name__}",
        (StudentMixin, base),
        {"config_class": student_config_class(base.config_class.model_type), "__module__": __name__},
    )


def __getattr__(name: str) -> type[PreTrainedModel]:
    """``DMT<BaseClass>`` classes, built on first access (what ``auto_map`` names)."""
    if name.startswith(CLASS_PREFIX):
        return student_model_class(name[len(CLASS_PREFIX) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
