"""An exported dmt student for ``transformers`` auto classes (``trust_remote_code=True``), dmt not needed.

The student is its base model class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...), subclassed per base
on demand as ``DMT<BaseClass>`` (this module's ``__getattr__``, named by ``config.json``'s ``auto_map``), with
the modules that ``config.dmt["blocks"]`` names swapped:

- ``featural`` / ``associative``: a :class:`MemoryRead` over the entries of ``memory/layer_XX/`` (the
  store's live rows: ``keys.npy``, ``values.npy``, ``live.npy``, checked against ``manifest.json``),
  searched exactly, in torch, on the model's device (beside the block's own MLP where it was kept);
- ``removed``: :class:`RemovedMLP` (the block has no MLP); ``lowrank``: :class:`LowRankMLP`.

Weight names are those of dmt's own student, so the weights file loads as it is; it is the ``dmt`` variant
(``model.dmt.safetensors``), which ``from_pretrained`` here asks for and the base class alone does not, so
that loading without ``trust_remote_code`` fails instead of returning the base model with random MLPs. A
memory read here
computes what dmt's layer computes in evaluation (same ``memory_ops``), with two differences a user should
know: nothing is inserted (an ``insert_during_eval`` student reads a fixed memory here), and the search is
exact, so a student trained with the approximate hnsw index may see slightly different neighbours.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel

from .configuration_dmt import CLASS_PREFIX, student_config_class
from .hnsw_file import read_hnsw_vectors
from .memory_ops import (
    ACTIVATIONS,
    AppendOne,
    OutputBias,
    mix_values,
    neighbour_distances,
    neighbour_dots,
    neighbour_weights,
    similarity_scores,
)

# The export layout version this code reads (dmt.model.persistence writes it).
EXPORT_FORMAT_VERSION = 4
# The weights file is model.<variant>.safetensors (transformers' `variant`).
WEIGHTS_VARIANT = "dmt"
# Queries per block of the exact search: bounds the (queries, entries) score matrix to 2**26 elements.
MAX_SCORE_ELEMENTS = 2**26


class MemoryRead(nn.Module):
    """A featural or associative memory layer, reading only: ``(B, T, C) → (B, T, C)``.

    ``spec`` is a block of ``config.dmt["blocks"]``: ``type``, and ``read`` with ``heads``, ``key_dim``,
    ``value_dim``, ``gate_dim``, ``dense``, ``topk``, ``metric``, ``temperature``, ``weighting`` and
    ``ranking``. The entries are set by :meth:`load_entries`; until then the layer outputs the output bias.
    With ``read["keep_mlp"]`` the block's own ``mlp`` runs beside the memory and the outputs add.
    """

    def __init__(self, d_model: int, spec: dict[str, Any], mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = spec["type"]
        read = spec["read"]
        self.mlp = None
        if read.get("keep_mlp", False):  # an export without the key keeps no MLP
            if mlp is None:
                raise ValueError("config.json: a memory kept beside its block's MLP needs that MLP")
            self.mlp = mlp
        self.heads, self.key_dim, self.value_dim = read["heads"], read["key_dim"], read["value_dim"]
        self.gate_dim = read["gate_dim"]
        self.topk, self.metric, self.temperature = read["topk"], read["metric"], read["temperature"]
        self.weighting, self.by_magnitude = read["weighting"], read["ranking"] == "magnitude"
        if read["dense"]:
            self.query_proj: nn.Module = nn.Linear(d_model, self.heads * self.key_dim)
            self.out_proj: nn.Module = nn.Linear(self.heads * self.value_dim, d_model)
        else:
            self.query_proj, self.out_proj = AppendOne(), OutputBias(d_model)
        self.gate_query_proj: nn.Module | None = None
        if self.gate_dim:
            # Without dense weights the gate query is the hidden state itself.
            self.gate_query_proj = (
                nn.Linear(d_model, self.heads * self.gate_dim) if read["dense"] else nn.Identity()
            )
        if self.kind == "associative":
            # Only inserts use them; kept so that the student's weights load whole and can be inspected.
            self.key_proj = nn.Linear(d_model, self.heads * self.key_dim)
            self.value_proj = nn.Linear(d_model, self.heads * self.value_dim)
        # Set by load_entries, as buffers so that they follow .to(): keys (H, Dk) float32, entries
        # (H, Dv + G) (value, then a gated featural layer's gate key), live (H,) bool.
        for name in ("keys", "entries", "live"):
            self.register_buffer(name, None, persistent=False)

    def load_entries(self, keys: torch.Tensor, entries: torch.Tensor, live: torch.Tensor) -> None:
        """Hold a store's rows ``keys (H, Dk)``, ``entries (H, E)`` and ``live (H,)`` as buffers, on the
        device of the layer's parameters (they follow later ``.to()`` calls)."""
        device = self.out_proj.bias.device
        self.keys, self.entries, self.live = keys.to(device), entries.to(device), live.to(device)

    def search(self, queries: torch.Tensor) -> torch.Tensor:
        """Ids ``(N, topk)`` of each query's nearest live entries (-1 padding), exactly: by distance, or by
        ``|similarity|`` with ``ranking: magnitude``."""
        ids = torch.full((len(queries), self.topk), -1, dtype=torch.long, device=queries.device)
        k = min(self.topk, int(self.live.sum())) if self.live is not None else 0
        if k == 0:
            return ids
        keys, queries = self.keys.to(queries.dtype), queries
        if self.metric == "cosine":
            keys, queries = F.normalize(keys, dim=1), F.normalize(queries, dim=1)
        offset = -keys.pow(2).sum(1) if self.metric == "l2" else None  # (H,): l2 ranks by 2 q·k - |k|²
        block = max(1, MAX_SCORE_ELEMENTS // len(keys))
        for begin in range(0, len(queries), block):
            scores = queries[begin : begin + block] @ keys.T  # (b, H)
            if offset is not None:
                scores = 2.0 * scores + offset
            if self.by_magnitude:
                scores = scores.abs()
            scores = scores.masked_fill(~self.live, float("-inf"))
            ids[begin : begin + block, :k] = scores.topk(k, dim=1).indices
        return ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]  # (B, T)
        queries = self.query_proj(hidden_states).reshape(-1, self.key_dim)  # (N, Dk), N = B·T·heads
        ids = self.search(queries)  # (N, K)
        valid = ids >= 0
        # Each distinct entry once, as a table; row 0 is an all-zero padding row when any id is -1.
        slots, rows = torch.unique(ids, return_inverse=True)  # (U,), (N, K)
        present = (slots >= 0)[:, None]
        if self.keys is None:
            keys = queries.new_zeros(len(slots), self.key_dim)
            entries = queries.new_zeros(len(slots), self.value_dim + self.gate_dim)
        else:
            keys = self.keys[slots.clamp_min(0)].to(queries.dtype) * present  # (U, Dk)
            entries = self.entries[slots.clamp_min(0)].to(queries.dtype) * present  # (U, Dv + G)
        distances = neighbour_distances(queries, keys, rows, self.metric)  # (N, K)
        scores = similarity_scores(distances, self.metric, self.temperature)
        gate = None
        if self.gate_query_proj is not None:
            gate_queries = self.gate_query_proj(hidden_states).reshape(-1, self.gate_dim)  # (N, G)
            gate = neighbour_dots(gate_queries, entries[:, self.value_dim :], rows)  # (N, K)
        weights = neighbour_weights(scores, valid, self.weighting, gate)  # (N, K)
        mixed = mix_values(weights, rows, entries[:, : self.value_dim])  # (N, Dv)
        output = self.out_proj(mixed.reshape(*batch_shape, self.heads * self.value_dim))  # (B, T, C)
        return output if self.mlp is None else output + self.mlp(hidden_states)


class RemovedMLP(nn.Module):
    """A deleted MLP: zeros shaped like the input, the residual stream passes through."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class LowRankMLP(nn.Module):
    """``act(x Kᵀ + b) [⊙ x Gᵀ] V + b_out``: ``rank`` hidden units in the form of the base model's MLP."""

    def __init__(self, d_model: int, spec: dict[str, Any]) -> None:
        super().__init__()
        form = spec["lowrank"]
        width = form["rank"]
        self.keys = nn.Linear(d_model, width, bias=form["key_bias"])
        self.gate_keys = nn.Linear(d_model, width, bias=False) if form["gated"] else None
        self.values = nn.Linear(width, d_model, bias=form["out_bias"])
        self.act = ACTIVATIONS[form["activation"]]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.keys(hidden_states))  # (B, T, r)
        if self.gate_keys is not None:
            hidden = hidden * self.gate_keys(hidden_states)
        return self.values(hidden)  # (B, T, C)


def swapped_module(d_model: int, spec: dict[str, Any], mlp: nn.Module | None = None) -> nn.Module:
    """The module that stands in for a block's MLP ``mlp``, per ``spec["type"]``."""
    kind = spec["type"]
    if kind in ("featural", "associative"):
        return MemoryRead(d_model, spec, mlp)
    if kind == "removed":
        return RemovedMLP()
    if kind == "lowrank":
        return LowRankMLP(d_model, spec)
    raise ValueError(f"config.json: dmt.blocks has an unknown layer type {kind!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_file(directory: Path, name: str, records: dict[str, Any]) -> Path:
    """``directory / name``, after checking it against its manifest record (size and SHA-256)."""
    path, record = directory / name, records.get(name)
    if record is None or not path.is_file():
        raise ValueError(f"{path}: missing or not listed in {directory / 'manifest.json'}")
    if path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
        raise ValueError(f"{path}: does not match its size and SHA-256 in {directory / 'manifest.json'}")
    return path


def read_store(directory: Path, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keys (H, Dk)``, ``entries (H, E)``, ``live (H,)`` of a saved store, checked against its manifest
    (sizes, SHA-256, shapes); ``ValueError`` naming the file. Values and keys are memory-mapped
    copy-on-write; a store without ``keys.npy`` keeps its keys in its hnsw graph (``index.bin``)."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: missing; the export's memory is incomplete")
    manifest = json.loads(manifest_path.read_text())
    records = manifest.get("files", {})
    read = spec["read"]
    if manifest.get("metric") != read["metric"]:
        raise ValueError(
            f"{manifest_path}: metric {manifest.get('metric')!r}, config says {read['metric']!r}"
        )
    arrays = {
        name: np.load(_checked_file(directory, name, records), mmap_mode="c", allow_pickle=False)
        for name in ("values.npy", "live.npy")
    }
    live = arrays["live.npy"].astype(bool)
    if "keys.npy" in records:
        arrays["keys.npy"] = np.load(_checked_file(directory, "keys.npy", records), mmap_mode="c")
    else:
        labels, vectors = read_hnsw_vectors(_checked_file(directory, "index.bin", records), read["key_dim"])
        keys = np.zeros((len(live), read["key_dim"]), dtype=np.float32)
        inside = labels < len(live)
        keys[labels[inside]] = vectors[inside]
        arrays["keys.npy"] = keys
    expected = {
        "keys.npy": (len(live), read["key_dim"]),
        "values.npy": (len(live), read["value_dim"] + read["gate_dim"]),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{directory / name}: shape {arrays[name].shape}, expected {shape}")
    return (
        torch.from_numpy(arrays["keys.npy"]),
        torch.from_numpy(arrays["values.npy"]),
        torch.from_numpy(live),
    )


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
        for block in spec["blocks"].values():
            mlp = self.get_submodule(block["module"])
            self.set_submodule(block["module"], swapped_module(config.hidden_size, block, mlp))

    def load_memory(self, directory: str | os.PathLike) -> None:
        """Read every memory layer's entries from the export ``directory`` (its ``memory/layer_XX``)."""
        for block in self.config.dmt["blocks"].values():
            if block["type"] in ("featural", "associative"):
                entries = read_store(Path(directory) / block["store"], block)
                self.get_submodule(block["module"]).load_entries(*entries)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """The base class's ``from_pretrained`` of the ``dmt`` weights variant, then the memory: from the
        export directory, or (a hub repository id) from its ``memory/`` files, downloaded like the weights."""
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
        return model


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
