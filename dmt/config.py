"""Config checks that run before any model loads (importing it also registers the configs' resolvers)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

import dmt.conf  # noqa: F401  (registers the ${pkg:...} resolver)
from dmt.distill.losses import DIVERGENCES
from dmt.errors import ConfigError
from dmt.layers import LayerConfig
from dmt.layers.swap import swap_settings
from dmt.model.loading import teacher_config
from dmt.model.surgery import resolve_layer_configs


def validate_config(cfg: DictConfig) -> dict[int, LayerConfig]:
    """Check the settings that can be checked from the teacher's config alone; return the layer plan.

    Every error names the config key at fault.
    """
    if OmegaConf.select(cfg, "teacher.name_or_path") is None and not OmegaConf.select(
        cfg, "teacher.random_init"
    ):
        raise ConfigError("teacher.name_or_path: give a hub id or a local directory")
    try:
        model_config = teacher_config(cfg.teacher)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"teacher.name_or_path: cannot read the config of {cfg.teacher.name_or_path!r}: {err}"
        ) from err
    swap: Any = OmegaConf.to_container(cfg.swap, resolve=True)
    layer_configs = resolve_layer_configs(swap_settings(swap), model_config)
    distill: Any = cfg.distill
    for key in ("alpha_kd", "alpha_ce", "alpha_hidden"):
        if distill[key] < 0:
            raise ConfigError(f"distill.{key}: must be >= 0, got {distill[key]}")
    if distill.alpha_kd + distill.alpha_ce + distill.alpha_hidden <= 0:
        raise ConfigError("distill.alpha_kd/alpha_ce/alpha_hidden: at least one loss weight must be > 0")
    if distill.get("trainable") == "memory" and all(c.type == "removed" for c in layer_configs.values()):
        raise ConfigError(
            "distill.trainable: 'memory' trains only the swapped layers, and none has parameters "
            "(swap.blocks chooses none, or swap.type is removed); use distill.trainable=all"
        )
    if distill.temperature <= 0:
        raise ConfigError(f"distill.temperature: must be > 0, got {distill.temperature}")
    divergence = distill.get("divergence", "forward_kl")
    if divergence not in DIVERGENCES:
        raise ConfigError(f"distill.divergence: expected one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if not 0.0 <= distill.get("jsd_beta", 0.5) <= 1.0:
        raise ConfigError(f"distill.jsd_beta: must lie in [0, 1], got {distill.jsd_beta}")
    if cfg.data.block_size > model_config.max_position_embeddings:
        raise ConfigError(
            f"data.block_size: {cfg.data.block_size} exceeds the teacher's context "
            f"({model_config.max_position_embeddings})"
        )
    return layer_configs
