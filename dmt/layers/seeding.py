"""Starting a memory layer as the MLP it replaces, read as a key-value memory (Geva et al., 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dmt.layers.mlp import FFNWeights

if TYPE_CHECKING:
    from dmt.layers.base import MemoryLayer


@torch.no_grad()
def seed_from_ffn(layer: MemoryLayer, ffn: FFNWeights) -> None:
    """Seed the store from the MLP it replaces, read as a key-value memory (Geva et al., 2021).

    ``MLP(x) = Σ_u act(k_u·x + b_u) v_u + b_out`` for ``keys (U, C)``, ``key_bias (U,)``,
    ``values (U, C)``. The bias is folded in by appending a constant 1 to ``x``; the query projection
    and stored keys are the truncated SVD of ``[keys | bias]`` (exact when ``key_dim >= C + 1``), the
    output projection and stored values that of ``values`` (exact when ``value_dim >= C``). With an
    inner-product store and the MLP's activation as ``weighting`` (what :meth:`MemoryConfig.resolved`
    derives), the layer then computes the MLP restricted to its top-k units. A gated MLP
    ``Σ_u act(k_u·x) (g_u·x) v_u`` (SwiGLU) also has ``gate_keys (U, C)``; with ``gate_dim >= C`` the
    gated layer reproduces it the same way. Without dense weights the store takes the MLP's rows as
    they are.
    """
    form = ffn.form
    if layer.heads != 1:
        raise ValueError("swap.store.init=ffn needs swap.read.heads=1")
    if form.units > layer.store.capacity:
        raise ValueError(
            f"swap.store.capacity={layer.store.capacity} cannot hold the MLP's {form.units} units"
        )
    if form.activation != layer.cfg.weighting:
        raise ValueError(
            f"swap.read.weighting={layer.cfg.weighting!r} does not compute the {form.activation} MLP"
        )
    if form.gated != (layer.gate_query_proj is not None):
        raise ValueError(
            f"swap.read.gate_dim={layer.cfg.gate_dim} does not fit a {'' if form.gated else 'non-'}gated MLP"
        )
    keys, values, gate_keys = ffn.keys, ffn.values, ffn.gate_keys
    bias = ffn.key_bias if ffn.key_bias is not None else keys.new_zeros(form.units)
    augmented = torch.cat([keys, bias[:, None]], dim=1)  # (U, C + 1)
    units = torch.arange(form.units).numpy()  # (U,): entry u is seeded from unit u
    layer.out_proj.bias.copy_(ffn.out_bias if ffn.out_bias is not None else torch.zeros(form.d_model))
    if not layer.cfg.dense:  # the store holds the MLP's own rows
        entries = values if gate_keys is None else torch.cat([values, gate_keys], dim=1)
        layer.store.insert(augmented.numpy(), entries.numpy(), origin_units=units)
        return
    key_coords, key_basis = low_rank_factors(augmented, layer.key_dim)  # (U, Dk), (Dk, C + 1)
    layer.query_proj.weight.copy_(key_basis[:, : form.d_model])
    layer.query_proj.bias.copy_(key_basis[:, form.d_model])
    value_coords, value_basis = low_rank_factors(values, layer.value_dim)  # (U, Dv), (Dv, C)
    layer.out_proj.weight.copy_(value_basis.T)
    entries = value_coords  # (U, Dv)
    if gate_keys is not None:
        gate_coords, gate_basis = low_rank_factors(gate_keys, layer.cfg.gate_width)  # (U, G), (G, C)
        layer.gate_query_proj.weight.copy_(gate_basis)
        layer.gate_query_proj.bias.zero_()
        entries = torch.cat([value_coords, gate_coords], dim=1)  # (U, Dv + G)
    layer.store.insert(key_coords.numpy(), entries.numpy(), origin_units=units)


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix (U, D) ≈ coords (U, rank) @ basis (rank, D)`` by truncated SVD; exact when rank >= rank(M).

    When ``rank`` exceeds ``min(U, D)`` the factors are zero-padded so shapes stay as asked.
    """
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    r = min(rank, s.numel())
    coords = torch.zeros(matrix.shape[0], rank, dtype=torch.float64)
    basis = torch.zeros(rank, matrix.shape[1], dtype=torch.float64)
    coords[:, :r] = u[:, :r] * s[:r]
    basis[:r] = vh[:r]
    return coords.float(), basis.float()
