"""The rules that derive a layer's settings from the model and the MLP it replaces, in one place.

A memory setting left ``None`` is derived when the layer is built: with ``init: ffn`` from the MLP it
replaces, so that the layer starts as that MLP restricted to its top-k units (an explicit value under which
it would compute something else is refused, naming it), otherwise from the generic defaults below. Then
the widths that other settings fix are checked: ``dense_weights: false`` reads and stores the hidden
states themselves, and residual-stream values (``inserted_values`` other than ``projected``) are
``d_model`` wide across the heads. A ``lowrank`` baseline's ``rank: null`` is the width with as many
parameters as the featural memory it stands against (:func:`resolve_baseline`). Saved configs are always
resolved; each setting's own range is checked where it is declared (:mod:`dmt.layers.config`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from dmt.layers.baselines import matched_rank
from dmt.layers.config import (
    AssociativeConfig,
    FeaturalConfig,
    LayerConfig,
    LowRankConfig,
    MemoryConfig,
    bad,
)
from dmt.layers.mlp import MLPForm

C = TypeVar("C", bound=LayerConfig)

# What a memory setting left None becomes without init: ffn (besides value_dim = d_model / heads).
GENERIC: dict[str, Any] = {
    "key_dim": 64,
    "temperature": 1.0,
    "metric": "ip",
    "capacity": 65536,
    "weighting": "softmax",
    "gate_dim": 0,
}


def resolve(cfg: C, d_model: int, mlp: MLPForm | None = None) -> C:
    """``cfg`` with every setting derived from the model filled in, for a residual stream of width
    ``d_model`` and, with ``init: ffn``, the form of the MLP it replaces. A baseline has nothing to derive
    but ``lowrank``'s ``rank: null``, which only :func:`resolve_baseline` can size."""
    if isinstance(cfg, LowRankConfig) and cfg.rank is None:
        raise bad("rank", "null is resolved with the memory settings it matches (resolve_baseline)")
    if not isinstance(cfg, MemoryConfig):
        return cfg
    derived = (
        from_mlp(cfg, d_model, mlp) if cfg.init == "ffn" else {**GENERIC, "value_dim": d_model // cfg.heads}
    )
    resolved = replace(cfg, **{key: value for key, value in derived.items() if getattr(cfg, key) is None})
    if isinstance(resolved, FeaturalConfig) and not resolved.dense_weights:
        _check_store_widths(resolved, d_model)
    if isinstance(resolved, AssociativeConfig) and resolved.inserted_values != "projected":
        _check_residual_values(resolved, d_model)
    return resolved


def resolve_baseline(cfg: LayerConfig, memory: FeaturalConfig, mlp: MLPForm) -> LayerConfig:
    """A baseline's ``cfg`` against the featural ``memory`` that the run's memory settings describe:
    ``memory`` is resolved (so validated alike), and ``lowrank``'s ``rank: null`` becomes the width whose
    parameter count is nearest to that memory layer's (:func:`dmt.layers.baselines.matched_rank`)."""
    memory = resolve(memory, mlp.d_model, mlp)
    if isinstance(cfg, LowRankConfig) and cfg.rank is None:
        cfg = replace(cfg, rank=matched_rank(memory, mlp))
    return resolve(cfg, mlp.d_model, mlp)


def from_mlp(cfg: MemoryConfig, d_model: int, mlp: MLPForm | None) -> dict[str, Any]:
    """The settings under which a layer seeded from ``mlp`` (``init: ffn``) starts as that MLP.

    Seeded from an MLP of ``U`` units, the store holds every unit (``capacity >= U``), read by inner
    product at temperature 1 and weighted by the MLP's activation, with exact widths: keys ``d_model + 1``
    (the unit's input weights and bias), values ``d_model`` and, for a gated MLP, gate keys ``d_model``.
    Smaller widths are allowed (the store then holds a truncated SVD of the MLP); explicit settings that
    would compute something else than the MLP are refused.
    """
    if mlp is None:
        raise bad("init", "init=ffn derives the layer from the MLP it replaces, and none was given")
    if mlp.d_model != d_model:
        raise bad("init", f"the MLP reads width {mlp.d_model}, the model is {d_model} wide")
    exact = {
        "key_dim": d_model + 1,
        "value_dim": d_model,
        "temperature": 1.0,
        "metric": "ip",
        "capacity": mlp.units,
        "weighting": mlp.activation,
        "gate_dim": d_model if mlp.gated else 0,
    }
    if cfg.heads != 1:
        raise bad("heads", f"init=ffn seeds one head from the MLP, got heads={cfg.heads}")
    for key in ("weighting", "metric", "temperature"):
        if getattr(cfg, key) not in (None, exact[key]):
            raise bad(
                key,
                f"the {mlp.activation} MLP that init=ffn seeds from needs {exact[key]!r}, got "
                f"{getattr(cfg, key)!r}; leave it unset to derive it",
            )
    if cfg.gate_dim is not None and (cfg.gate_dim > 0) != mlp.gated:
        why = "would drop the MLP's up projection" if mlp.gated else "has no gate to seed from"
        raise bad("gate_dim", f"{cfg.gate_dim} {why}; leave it unset to derive it")
    for key in ("key_dim", "value_dim", "gate_dim"):
        if getattr(cfg, key) is not None and getattr(cfg, key) > exact[key]:
            raise bad(key, f"at most {exact[key]} for this MLP (exact), got {getattr(cfg, key)}")
    if cfg.capacity is not None and cfg.capacity < mlp.units:
        raise bad("capacity", f"{cfg.capacity} cannot hold the MLP's {mlp.units} units")
    return exact


def _check_store_widths(cfg: FeaturalConfig, d_model: int) -> None:
    """``dense_weights: false``: queries and values are the hidden states themselves (plus a 1)."""
    widths = {"key_dim": d_model + 1, "value_dim": d_model}
    if cfg.gate_dim:
        widths["gate_dim"] = d_model
    for key, wanted in widths.items():
        if getattr(cfg, key) != wanted:
            raise bad(
                key, f"dense_weights=false needs {key}={wanted} (d_model={d_model}), got {getattr(cfg, key)}"
            )


def _check_residual_values(cfg: AssociativeConfig, d_model: int) -> None:
    """Residual-stream values (``mlp_output``, ``next_token``) are ``d_model`` wide across the heads."""
    if cfg.heads * cfg.value_dim != d_model:
        raise bad(
            "value_dim",
            f"inserted_values={cfg.inserted_values} stores d_model-wide vectors: heads x value_dim must be "
            f"{d_model}, got {cfg.heads} x {cfg.value_dim}",
        )
