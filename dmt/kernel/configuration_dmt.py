"""The configuration of an exported dmt student, for ``transformers`` auto classes (``trust_remote_code``).

A student is its base model (GPT-2, Llama, ...) with some MLPs swapped, so its config is the base model's
config class, subclassed: every field of the base stays as it is, ``model_type`` included, and one more is
added, ``dmt`` (the swapped blocks, see :mod:`modeling_dmt`). The subclass is made per base on demand:
``config.json``'s ``auto_map`` names ``configuration_dmt.DMT<BaseConfig>`` (``DMTLlamaConfig``,
``DMTGPT2Config``) and this module's ``__getattr__`` builds that class from the base config class of the
same name. Since the ``model_type`` is one ``transformers`` knows, what needs only the config (a tokenizer)
loads without ``trust_remote_code`` and without asking; the model itself does not (:mod:`modeling_dmt`).
"""

from __future__ import annotations

from functools import cache

import transformers
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

CLASS_PREFIX = "DMT"


def base_model_type(base_config_name: str) -> str:
    """The ``model_type`` of the ``transformers`` config class ``base_config_name`` (``LlamaConfig`` →
    ``llama``)."""
    base = getattr(transformers, base_config_name, None)
    if not (isinstance(base, type) and issubclass(base, PretrainedConfig)):
        raise AttributeError(
            f"transformers has no config class {base_config_name!r} to base a dmt student on"
        )
    return base.model_type


@cache
def student_config_class(model_type: str) -> type[PretrainedConfig]:
    """``DMT<BaseConfig>``: the config class of a student whose base model is of ``model_type``."""
    base = CONFIG_MAPPING[model_type]
    return type(
        f"{CLASS_PREFIX}{base.__name__}",
        (base,),
        {"__module__": __name__},
    )


def __getattr__(name: str) -> type[PretrainedConfig]:
    """``DMT<BaseConfig>`` classes, built on first access (what ``auto_map`` names)."""
    if name.startswith(CLASS_PREFIX) and name.endswith("Config"):
        return student_config_class(base_model_type(name[len(CLASS_PREFIX) :]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
