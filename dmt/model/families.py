"""Where each decoder family keeps its blocks and MLPs, and how to read an MLP as a key-value memory.

The only place that knows model internals: adding a family means adding one ``DecoderFamily`` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class FFNWeights:
    """An MLP as ``Σ_u act(k_u·x + b_u) [g_u·x] v_u + b_out`` (Geva et al., 2021); ``[g_u·x]`` if gated.

    ``activation`` names the activation's family (the ``weighting`` a featural memory uses for it);
    ``act_fn`` is the MLP's own activation module, exact (GPT-2's tanh-approximated GELU, for instance), so
    a dense layer of the same form (:class:`dmt.layers.baselines.LowRankMLP`) computes what the MLP does.
    """

    keys: torch.Tensor  # (U, C)
    key_bias: torch.Tensor | None  # (U,)
    values: torch.Tensor  # (U, C)
    out_bias: torch.Tensor | None  # (C,)
    activation: str
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    gate_keys: torch.Tensor | None = None  # (U, C): gated MLPs scale unit u by gate_keys[u]·x


@dataclass(frozen=True)
class DecoderFamily:
    name: str
    blocks: Callable[[PreTrainedModel], nn.ModuleList]
    ffn_weights: Callable[[nn.Module], FFNWeights]
    mlp_attr: str = "mlp"


def _gpt2_ffn(mlp: nn.Module) -> FFNWeights:
    # GPT-2 uses Conv1D: weight is (in_features, out_features).
    return FFNWeights(
        keys=mlp.c_fc.weight.detach().T,
        key_bias=mlp.c_fc.bias.detach(),
        values=mlp.c_proj.weight.detach(),
        out_bias=mlp.c_proj.bias.detach(),
        activation="gelu",
        act_fn=mlp.act,
    )


def _gated_ffn(mlp: nn.Module) -> FFNWeights:
    # SwiGLU: down(silu(gate·x) * up·x). Read as a memory, the gate rows are the keys (they choose the
    # units), the down columns the values, and the up rows each unit's multiplicative gate key.
    return FFNWeights(
        keys=mlp.gate_proj.weight.detach(),
        key_bias=None,
        values=mlp.down_proj.weight.detach().T,
        out_bias=None,
        activation="silu",
        act_fn=mlp.act_fn,
        gate_keys=mlp.up_proj.weight.detach(),
    )


_LLAMA_LIKE = DecoderFamily("llama", blocks=lambda m: m.model.layers, ffn_weights=_gated_ffn)
FAMILIES: dict[str, DecoderFamily] = {
    "gpt2": DecoderFamily("gpt2", blocks=lambda m: m.transformer.h, ffn_weights=_gpt2_ffn),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def family_of(config: PretrainedConfig) -> DecoderFamily:
    """The family of a model config, or a ``ValueError`` listing the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"teacher: model_type {config.model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    return family


def get_mlp(model: PreTrainedModel, index: int) -> nn.Module:
    family = family_of(model.config)
    return getattr(family.blocks(model)[index], family.mlp_attr)


def set_mlp(model: PreTrainedModel, index: int, module: nn.Module) -> None:
    family = family_of(model.config)
    setattr(family.blocks(model)[index], family.mlp_attr, module)
