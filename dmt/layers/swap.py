"""The nested ``swap`` group as users write it, turned into the flat plan the layers are built from.

Under ``swap`` the layer settings sit in groups by concern (:data:`dmt.layers.config.GROUPS`: ``read``,
``store``, ``write``, ``output``) beside ``blocks``, ``type``, ``per_block`` and ``index``; each setting's
group is recorded once, on its config dataclass field. The flat plan (one mapping of setting names, as
:func:`dmt.model.surgery.resolve_layer_configs` reads it and as checkpoints and exports save the settings)
is what the dataclasses take.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from dmt.errors import ConfigError
from dmt.layers.config import GROUPS, SELECTION_KEYS, SETTING_GROUPS, swap_key


def swap_settings(swap: Mapping[str, Any]) -> dict[str, Any]:
    """The flat plan (``blocks``, ``type``, ``per_block`` and flat settings, as
    :func:`dmt.model.surgery.resolve_layer_configs` reads it) of a nested ``swap`` mapping:
    ``{read: {topk: 16}}`` → ``{topk: 16}``; each ``per_block`` entry alike.

    A key outside its group, a flat key or an unknown one is refused, naming its full key and, where the
    setting exists, where it belongs (``swap.topk: moved to swap.read.topk``).
    """
    selection = {key: value for key, value in swap.items() if key in SELECTION_KEYS}
    flat = selection | _flat_settings({k: v for k, v in swap.items() if k not in selection}, "swap")
    if selection.get("per_block"):
        flat["per_block"] = {
            index: _flat_settings(entry, f"swap.per_block.{index}")
            for index, entry in selection["per_block"].items()
        }
    return flat


def _flat_settings(nested: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The flat settings of the groups (and ``index``) in ``nested``, found under ``prefix``."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if key in SETTING_GROUPS:
            if SETTING_GROUPS[key] is not None:
                raise ConfigError(f"{prefix}.{key}: moved to {swap_key(key, prefix)}")
            flat[key] = value  # index: the backend's settings stay one mapping
        elif key not in GROUPS:
            mappings = (*GROUPS, *(name for name, group in SETTING_GROUPS.items() if group is None))
            top = (*SELECTION_KEYS, *mappings) if prefix == "swap" else mappings
            raise ConfigError(f"{prefix}.{key}: unknown; {prefix} has {', '.join(top)}")
        elif not isinstance(value, Mapping):
            raise ConfigError(f"{prefix}.{key}: expected a mapping of {key} settings, got {value!r}")
        else:
            for name, setting_value in value.items():
                if SETTING_GROUPS.get(name) != key:
                    raise ConfigError(f"{prefix}.{key}.{name}: {_misplaced(name, key, prefix)}")
                flat[name] = setting_value
    return flat


def _misplaced(name: str, group: str, prefix: str) -> str:
    """Why ``name`` is not a setting of ``group``: where it belongs, or the nearest setting's full key."""
    if name in SETTING_GROUPS:
        return f"not a {group} setting; it is {swap_key(name, prefix)}"
    own = sorted(n for n, g in SETTING_GROUPS.items() if g == group)
    near = difflib.get_close_matches(name, list(SETTING_GROUPS), n=1)
    hint = f" (did you mean {swap_key(near[0], prefix)}?)" if near else ""
    return f"unknown {group} setting{hint}; {group} has {', '.join(own)}"
