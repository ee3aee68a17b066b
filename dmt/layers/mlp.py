"""What a swapped layer knows of the MLP it replaces: its form (from the model config) and its weights.

``dmt.model.families`` is the one place that reads these out of a model; the layers only consume them, so
nothing in ``dmt.layers`` imports the model package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The weighting (a name of :data:`dmt.kernel.ops.ACTIVATIONS`) that computes each activation a model's
# config can name (``hidden_act`` / ``activation_function``): GPT-2's ``gelu_new`` is the tanh approximation
# of GELU.
WEIGHTING_OF_ACTIVATION: dict[str, str] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


def activation_family(name: str) -> str:
    """The weighting (``relu``, ``gelu``, ``gelu_tanh`` or ``silu``) that computes activation ``name``."""
    if name not in WEIGHTING_OF_ACTIVATION:
        raise ValueError(
            f"teacher: MLP activation {name!r} has no memory weighting; "
            f"supported: {sorted(WEIGHTING_OF_ACTIVATION)}"
        )
    return WEIGHTING_OF_ACTIVATION[name]


@dataclass(frozen=True)
class MLPForm:
    """The shape of an MLP ``Σ_u act(k_u·x + b_u) [g_u·x] v_u + b_out`` with ``units`` hidden units.

    Read from the model config alone (no weights), so layer settings can be derived and checked before a
    model loads.
    """

    d_model: int
    units: int
    activation: str  # a weighting name: relu | gelu | gelu_tanh | silu
    gated: bool  # SwiGLU-like: each unit's activation is scaled by g_u·x
    key_bias: bool
    out_bias: bool


@dataclass(frozen=True)
class FFNWeights:
    """An MLP as ``Σ_u act(k_u·x + b_u) [g_u·x] v_u + b_out`` (Geva et al., 2021); ``[g_u·x]`` if gated.

    ``act_fn`` is the MLP's own activation module, exact, so a dense layer of the same form
    (:class:`dmt.layers.baselines.LowRankMLP`) computes what the MLP does.
    """

    keys: torch.Tensor  # (U, C)
    key_bias: torch.Tensor | None  # (U,)
    values: torch.Tensor  # (U, C)
    out_bias: torch.Tensor | None  # (C,)
    activation: str  # a weighting name, as in MLPForm
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    gate_keys: torch.Tensor | None = None  # (U, C): gated MLPs scale unit u by gate_keys[u]·x

    @property
    def form(self) -> MLPForm:
        units, d_model = self.keys.shape
        return MLPForm(
            d_model=d_model,
            units=units,
            activation=self.activation,
            gated=self.gate_keys is not None,
            key_bias=self.key_bias is not None,
            out_bias=self.out_bias is not None,
        )
