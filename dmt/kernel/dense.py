"""The dense layers swapped in for an MLP as baselines of a memory layer: their forward, in torch alone.

:class:`RemovedMLP` (``swap.type: removed``) outputs zeros, so the block's residual stream passes through;
:class:`LowRankMLP` (``lowrank``) is an MLP of the replaced one's form with fewer hidden units.
``dmt.layers.baselines`` adds their settings and their seeding from the replaced MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RemovedMLP(nn.Module):
    """A deleted MLP: zeros shaped like the input ``(B, T, C)``; no parameters."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class LowRankMLP(nn.Module):
    """``x → act(x Kᵀ + b) [⊙ x Gᵀ] V + b_out`` with ``width`` hidden units.

    The form is the replaced MLP's: on a Llama-family model a SwiGLU MLP (``keys`` = gate projection,
    ``gate_keys`` = up projection, ``values`` = down projection), on GPT-2 a GELU MLP (``keys`` = ``c_fc``,
    ``values`` = ``c_proj``), with the biases that MLP has.
    """

    def __init__(
        self,
        d_model: int,
        width: int,  # hidden units
        *,
        gated: bool,  # each unit's activation scaled by g_u·x (SwiGLU)
        key_bias: bool,
        out_bias: bool,
        act: Callable[[torch.Tensor], torch.Tensor],  # the MLP's activation
    ) -> None:
        super().__init__()
        self.width = width
        self.keys = nn.Linear(d_model, width, bias=key_bias)  # (C) → (r)
        self.gate_keys = nn.Linear(d_model, width, bias=False) if gated else None
        self.values = nn.Linear(width, d_model, bias=out_bias)  # (r) → (C)
        self.act = act

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.keys(hidden_states))  # (B, T, r)
        if self.gate_keys is not None:
            hidden = hidden * self.gate_keys(hidden_states)  # (B, T, r)
        return self.values(hidden)  # (B, T, C)
