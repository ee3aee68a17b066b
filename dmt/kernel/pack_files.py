"""Reading a memory pack's files in numpy and torch alone: its ``pack.json``, each document's shard
checked against its manifest, and the fingerprint of the student a pack is made for.

The layout (``dmt.packs`` writes it): ``pack.json`` (format version, the student's fingerprint and name,
each layer's settings, the reading, one record per document) and ``shards/<NNNNNN>/`` per document, with
``layer_XX.{keys,values,offsets,tokens}.npy`` and a ``manifest.json`` of every file's size and SHA-256.
``dmt.packs`` reads packs with these functions, and so does an exported student loaded with plain
``transformers`` (``from_pretrained(export, trust_remote_code=True, dmt_memory=PACK)``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .store_files import MANIFEST, StoreFileError, read_manifest, verify_files

PACK_FORMAT_VERSION = 2
PACK_MANIFEST = "pack.json"
SHARDS = "shards"
ARRAYS = ("keys", "values", "offsets", "tokens")
# Layer settings that weigh what a layer reads and leave what it stores alone: a pack made under one value
# reads under any other.
READING_SETTINGS = frozenset(
    {
        "topk",
        "temperature",
        "null_distance",
        "max_distance",
        "residual_distance_scale",
        "next_token_weight",
        "next_token_topk",
        "next_token_temperature",
        "next_token_distance_scale",
    }
)


def stored_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A layer's settings (``LayerConfig.to_dict()``) less its :data:`READING_SETTINGS`: what a pack made by
    that layer depends on."""
    return {key: value for key, value in settings.items() if key not in READING_SETTINGS}


def array_file(block: str, name: str) -> str:
    """The file of array ``name`` of the layer of block ``block`` in a shard."""
    return f"layer_{int(block):02d}.{name}.npy"


def read_pack_json(directory: Path) -> dict[str, Any]:
    """The parsed ``pack.json`` of the pack ``directory``, of this format.

    Raises:
        StoreFileError: naming the directory or file when it is not a pack of this format.
    """
    path = directory / PACK_MANIFEST
    if not directory.is_dir():
        raise StoreFileError(f"{directory}: no such memory pack directory")
    if not path.is_file():
        raise StoreFileError(
            f"{directory}: not a memory pack (no {PACK_MANIFEST}; dmt-memorize writes packs)"
        )
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as err:
        raise StoreFileError(f"{path}: not valid JSON ({err})") from err
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != PACK_FORMAT_VERSION:
        hint = (
            "; format 1 packs lack their entries' next tokens: run dmt-memorize again" if version == 1 else ""
        )
        raise StoreFileError(
            f"{path}: pack format {version!r} is not the one read here ({PACK_FORMAT_VERSION}){hint}"
        )
    return raw


def read_shard(
    shard: Path,
    block: str,
    count: int,
    key_dim: int | None,
    entry_dim: int | None,
    verify: bool = True,
    names: tuple[str, ...] = ARRAYS,
    mmap: bool = False,
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of ``keys (M, Dk)``, ``values (M, E)``, ``offsets (M,)`` and ``tokens (M,)`` of
    the layer of block ``block`` in ``shard``, ``M = count``, checked against the shard's manifest (sizes;
    with ``verify`` also SHA-256); a width of None is not checked. ``mmap``: mapped read-only, not read.

    Raises:
        StoreFileError: naming the file that is missing, changed or of another shape.
    """
    files = {name: array_file(block, name) for name in names}
    try:
        records = read_manifest(shard)["files"]
    except (FileNotFoundError, KeyError, TypeError) as err:
        raise StoreFileError(f"{shard / MANIFEST}: missing or malformed ({err})") from err
    verify_files(shard, records, list(files.values()), checksums=verify)
    arrays = {}
    expected = {
        "keys": (count, key_dim),
        "values": (count, entry_dim),
        "offsets": (count,),
        "tokens": (count,),
    }
    for name, file in files.items():
        try:
            arrays[name] = np.load(shard / file, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as err:
            raise StoreFileError(f"{shard / file}: not a readable .npy array ({err})") from err
        shape = tuple(
            got if want is None else want
            for got, want in zip(arrays[name].shape, expected[name], strict=False)
        )
        if (
            arrays[name].shape != shape
            or len(shape) != len(expected[name])
            or arrays[name].dtype.kind not in "fi"
        ):
            raise StoreFileError(
                f"{shard / file}: {arrays[name].dtype} {arrays[name].shape}, expected {expected[name]} "
                "as pack.json records"
            )
    return arrays


def pack_entries(
    directory: Path, raw: dict[str, Any], block: str, key_dim: int, entry_dim: int, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every document's ``keys (M, Dk)``, entries ``(M, E)`` and next tokens ``(M,)`` int64 for the layer
    of block ``block``, in document order, from the pack ``directory`` whose ``pack.json`` is ``raw``."""
    keys, entries = [np.zeros((0, key_dim), np.float32)], [np.zeros((0, entry_dim), np.float32)]
    tokens = [np.zeros(0, np.int64)]
    for document in raw["documents"]:
        shard = str(document["shard"])
        if Path(shard).name != shard or not shard.isdigit():
            raise StoreFileError(f"{directory / PACK_MANIFEST}: {shard!r} is not a shard name")
        count = int(document["entries"].get(block, 0))
        try:
            arrays = read_shard(directory / SHARDS / shard, block, count, key_dim, entry_dim, verify)
        except StoreFileError as err:
            raise StoreFileError(f"{err} (document {document['name']!r})") from err
        keys.append(arrays["keys"].astype(np.float32))
        entries.append(arrays["values"])
        tokens.append(arrays["tokens"].astype(np.int64))
    return tuple(torch.from_numpy(np.concatenate(parts)) for parts in (keys, entries, tokens))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a student's state dict (names, dtypes, shapes and bytes, in name order): the same for
    a student trained by dmt and for its export loaded with dmt or with plain ``transformers``."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()
