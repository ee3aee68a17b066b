"""Where each decoder family keeps its blocks and MLPs, and how to read an MLP as a key-value memory.

The only place that knows model internals: adding a family means adding one ``DecoderFamily`` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dmt.layers.mlp import FFNWeights, MLPForm, activation_family


@dataclass(frozen=True)
class DecoderFamily:
    name: str
    blocks: Callable[[PreTrainedModel], nn.ModuleList]
    ffn_weights: Callable[[nn.Module, str], FFNWeights]  # (MLP, its activation's weighting)
    mlp_form: Callable[[PretrainedConfig], MLPForm]
    final_norm: Callable[[PreTrainedModel], nn.Module]  # the norm between the last block and the head
    mlp_attr: str = "mlp"


def _gpt2_ffn(mlp: nn.Module, activation: str) -> FFNWeights:
    # GPT-2 uses Conv1D: weight is (in_features, out_features).
    return FFNWeights(
        keys=mlp.c_fc.weight.detach().T,
        key_bias=mlp.c_fc.bias.detach(),
        values=mlp.c_proj.weight.detach(),
        out_bias=mlp.c_proj.bias.detach(),
        activation=activation,
        act_fn=mlp.act,
    )


def _gpt2_form(config: PretrainedConfig) -> MLPForm:
    return MLPForm(
        d_model=config.n_embd,
        units=config.n_inner or 4 * config.n_embd,
        activation=activation_family(config.activation_function),
        gated=False,
        key_bias=True,
        out_bias=True,
    )


def _gated_ffn(mlp: nn.Module, activation: str) -> FFNWeights:
    # SwiGLU: down(act(gate·x) * up·x). Read as a memory, the gate rows are the keys (they choose the
    # units), the down columns the values, and the up rows each unit's multiplicative gate key.
    return FFNWeights(
        keys=mlp.gate_proj.weight.detach(),
        key_bias=None,
        values=mlp.down_proj.weight.detach().T,
        out_bias=None,
        activation=activation,
        act_fn=mlp.act_fn,
        gate_keys=mlp.up_proj.weight.detach(),
    )


def _gated_form(config: PretrainedConfig) -> MLPForm:
    if getattr(config, "mlp_bias", False):
        # A bias on the up projection has no place in a gated entry (g_u·x + c is not a dot product).
        raise ValueError("teacher: gated MLPs with biases (mlp_bias=True) are not supported")
    return MLPForm(
        d_model=config.hidden_size,
        units=config.intermediate_size,
        activation=activation_family(config.hidden_act),
        gated=True,
        key_bias=False,
        out_bias=False,
    )


_LLAMA_LIKE = DecoderFamily(
    "llama",
    blocks=lambda m: m.model.layers,
    ffn_weights=_gated_ffn,
    mlp_form=_gated_form,
    final_norm=lambda m: m.model.norm,
)
FAMILIES: dict[str, DecoderFamily] = {
    "gpt2": DecoderFamily(
        "gpt2",
        blocks=lambda m: m.transformer.h,
        ffn_weights=_gpt2_ffn,
        mlp_form=_gpt2_form,
        final_norm=lambda m: m.transformer.ln_f,
    ),
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


def mlp_form(config: PretrainedConfig) -> MLPForm:
    """The form of the model's MLPs (every block's alike), read from its config alone."""
    return family_of(config).mlp_form(config)


def mlp_weights(model: PreTrainedModel, index: int) -> FFNWeights:
    """The MLP of block ``index`` read as a key-value memory."""
    return family_of(model.config).ffn_weights(get_mlp(model, index), mlp_form(model.config).activation)


def num_blocks(model: PreTrainedModel) -> int:
    return len(family_of(model.config).blocks(model))


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm the last block's output passes through before the output head."""
    return family_of(model.config).final_norm(model)


def get_mlp(model: PreTrainedModel, index: int) -> nn.Module:
    family = family_of(model.config)
    return getattr(family.blocks(model)[index], family.mlp_attr)


def set_mlp(model: PreTrainedModel, index: int, module: nn.Module) -> None:
    family = family_of(model.config)
    setattr(family.blocks(model)[index], family.mlp_attr, module)


def mlp_path(model: PreTrainedModel, index: int) -> str:
    """The qualified name of block ``index``'s MLP in ``model`` (``model.layers.3.mlp``)."""
    target = get_mlp(model, index)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"block {index}'s MLP is not a submodule of the model")
