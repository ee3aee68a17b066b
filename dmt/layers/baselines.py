"""Dense baselines for memory layers: what the same MLP swap gives without a memory.

Each plugs into the swap exactly like a memory layer (``swap.type: removed | lowrank``,
:func:`dmt.model.surgery.attach_memory_layers`), with the same ``(B, T, C) -> (B, T, C)`` signature and
its settings saved with exports, so a quality comparison changes one setting and nothing else:

- :class:`RemovedMLP`, ``removed``: the block has no MLP (its output is zero); what fine-tuning the rest of
  the student recovers without any replacement. Untrained, it is the *ablated teacher* of the evaluation.
- :class:`LowRankMLP`, ``lowrank``: a dense MLP of the teacher's own form (SwiGLU for the Llama family,
  GELU for GPT-2) with ``r`` hidden units, ``r`` chosen so that it has as many parameters as the memory
  layer it stands against (:func:`matched_rank`), warm-started from the teacher MLP's ``r`` most
  important units (structured pruning), the dense counterpart of a memory layer's ``init: ffn``.
"""

from __future__ import annotations

import torch

from dmt.kernel import dense
from dmt.layers.config import FeaturalConfig, LayerConfig, LowRankConfig, MemoryConfig, RemovedConfig, bad
from dmt.layers.mlp import FFNWeights, MLPForm


class RemovedMLP(dense.RemovedMLP):
    """A deleted MLP (:class:`dmt.kernel.dense.RemovedMLP`) with its settings (``cfg``) for exports."""

    def __init__(self, cfg: RemovedConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or RemovedConfig()


def memory_layer_parameters(d_model: int, cfg: MemoryConfig) -> int:
    """Dense parameters of the memory layer that the resolved ``cfg`` describes (stored entries are not
    parameters).

    Featural: ``query_proj`` (C → H·Dk), ``gate_query_proj`` (C → H·G, if gated) and ``out_proj``
    (H·Dv → C), all with biases; associative adds ``key_proj`` (C → H·Dk) and ``value_proj`` (C → H·Dv).
    Mirrors the constructors in :mod:`dmt.layers.base`, :mod:`~dmt.layers.featural` and
    :mod:`~dmt.layers.associative` (a test holds them equal).
    """
    if not cfg.has_store:
        raise ValueError(f"swap.type: {cfg.type!r} is not a memory layer")
    if not cfg.dense:
        return d_model  # the output bias alone
    heads, key_dim, value_dim = cfg.heads, cfg.key_dim, cfg.value_dim

    def linear(d_in: int, d_out: int) -> int:
        return d_in * d_out + d_out

    count = linear(d_model, heads * key_dim) + linear(heads * value_dim, d_model)
    if cfg.gate_width:
        count += linear(d_model, heads * cfg.gate_width)
    if cfg.type == "associative":
        count += linear(d_model, heads * key_dim) + linear(d_model, heads * value_dim)
    return count


def lowrank_parameters(d_model: int, width: int, *, gated: bool, key_bias: bool, out_bias: bool) -> int:
    """Parameters of a :class:`LowRankMLP` of ``width`` hidden units: ``(2 or 3)·C·r`` weights, plus
    ``r`` key biases and ``C`` output biases where the teacher's form has them (GPT-2 does, Llama not)."""
    return width * (d_model * (3 if gated else 2) + int(key_bias)) + d_model * int(out_bias)


def matched_rank(cfg: FeaturalConfig, mlp: MLPForm) -> int:
    """The hidden width whose :func:`lowrank_parameters` (in the form of ``mlp``) is nearest to the
    parameter count of the featural memory layer that the resolved ``cfg`` describes."""
    d_model = mlp.d_model
    target = memory_layer_parameters(d_model, cfg)
    per_unit = lowrank_parameters(d_model, 1, gated=mlp.gated, key_bias=mlp.key_bias, out_bias=False)
    return max(1, round((target - d_model * int(mlp.out_bias)) / per_unit))


def unit_importance(ffn: FFNWeights) -> torch.Tensor:
    """``(U,)`` importance of each MLP unit: ``‖[k_u, b_u]‖ · ‖v_u‖`` (``· ‖g_u‖`` if gated).

    A unit's contribution ``act(k_u·x + b_u) (g_u·x) v_u`` scales with these norms, so pruning the
    smallest products removes the units that can contribute least (a magnitude criterion).
    """
    keys = ffn.keys if ffn.key_bias is None else torch.cat([ffn.keys, ffn.key_bias[:, None]], dim=1)
    importance = keys.norm(dim=1) * ffn.values.norm(dim=1)
    if ffn.gate_keys is not None:
        importance = importance * ffn.gate_keys.norm(dim=1)
    return importance


class LowRankMLP(dense.LowRankMLP):
    """A narrower MLP of the teacher's own form (:class:`dmt.kernel.dense.LowRankMLP`) with its settings
    (``cfg``), ``r = cfg.rank`` hidden units.

    The form (gated or not, which biases, the exact activation) is read from the MLP it replaces, given as
    :class:`~dmt.layers.mlp.FFNWeights`. With ``cfg.init == "ffn"`` the layer starts as the MLP restricted
    to its ``r`` most important units (:meth:`init_from_ffn`).
    """

    def __init__(self, d_model: int, cfg: LowRankConfig, ffn: FFNWeights, seed: bool = True) -> None:
        """``seed=False`` skips ``init: ffn`` (saved weights are loaded over the layer instead)."""
        form = ffn.form
        if form.d_model != d_model:
            raise ValueError(f"the MLP reads width {form.d_model}, the model is {d_model} wide")
        if cfg.rank is None:
            raise bad("rank", "null is resolved with the memory settings it matches (dmt.layers.resolve)")
        super().__init__(
            d_model,
            int(cfg.rank),
            gated=form.gated,
            key_bias=form.key_bias,
            out_bias=form.out_bias,
            act=ffn.act_fn,
        )
        self.cfg = cfg
        if cfg.init == "ffn" and seed:
            self.init_from_ffn(ffn)

    @torch.no_grad()
    def init_from_ffn(self, ffn: FFNWeights) -> None:
        """Copy the MLP's ``r`` most important units (:func:`unit_importance`), in their original order.

        With ``r`` at least the MLP's width ``U`` every unit is kept and the layer computes the MLP exactly;
        the ``r - U`` extra units keep their random keys but get zero values, so they add nothing at the
        start and learn from there.
        """
        n_units = ffn.keys.shape[0]
        kept = min(self.width, n_units)
        units = unit_importance(ffn).topk(kept).indices.sort().values  # (kept,)
        self.keys.weight[:kept].copy_(ffn.keys[units])  # (kept, C)
        if ffn.key_bias is not None:
            self.keys.bias[:kept].copy_(ffn.key_bias[units])
        if self.gate_keys is not None:
            self.gate_keys.weight[:kept].copy_(ffn.gate_keys[units])
        self.values.weight.zero_()
        self.values.weight[:, :kept].copy_(ffn.values[units].T)  # (C, kept)
        if ffn.out_bias is not None:
            self.values.bias.copy_(ffn.out_bias)

    def extra_repr(self) -> str:
        return f"width={self.width}, gated={self.gate_keys is not None}, init={self.cfg.init}"


def build_baseline(
    d_model: int, cfg: LayerConfig, ffn: FFNWeights, seed: bool = True
) -> RemovedMLP | LowRankMLP:
    """The baseline of ``cfg.type`` for the MLP ``ffn`` (read from the block it replaces); ``seed=False``
    leaves its weights to be loaded."""
    if isinstance(cfg, RemovedConfig):
        return RemovedMLP(cfg)
    if isinstance(cfg, LowRankConfig):
        return LowRankMLP(d_model, cfg, ffn, seed=seed)
    raise ValueError(f"swap.type: {cfg.type!r} is not a baseline layer type")
