"""Reading a corpus into a memory pack, and putting a pack into a student.

The student reads each document with sliding windows (window, stride as in perplexity), with its memory as
it was saved: every memory layer that inserts (``novelty_threshold`` set) hands over what it would insert
(:meth:`~dmt.layers.protocol.MemoryProtocol.collecting`), and nothing is stored in the student. Each token
that has a successor in its window gives one entry per head (unless the layer's novelty rule rejects it),
read in the window where the token is scored, so every token of a document is read once with at least
``window - stride`` tokens of context. An entry records the token offset it was read at; its document is
the shard it lies in (:mod:`dmt.packs.files`).

A pack replaces the memory of the layers it holds (:func:`use_pack`): the store holds the pack's entries,
in document order, plus room for the layer's own ``capacity`` of entries inserted later (a long-document
reading).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from dmt.errors import ConfigError
from dmt.evaluation.perplexity import window_batch, windows
from dmt.files import check_directory_target, write_directory
from dmt.kernel.pack_files import READING_SETTINGS, pack_entries, weights_fingerprint
from dmt.kernel.store_files import StoreFileError
from dmt.layers import MemoryLayer
from dmt.memory.integrity import store_errors
from dmt.model.surgery import memory_layers, memory_protocol
from dmt.packs.disk import DISK, DiskPack, PackStore
from dmt.packs.files import (
    SHARDS,
    PackDocument,
    PackError,
    PackManifest,
    is_pack,
    next_shard,
    read_pack,
    same_maker,
    write_manifest,
    write_shard,
)

# Experiments whose students have a memory layer that inserts, named when a student has none.
INSERTING_EXPERIMENTS = "experiment=associative_cache"


def inserting_layers(model: PreTrainedModel) -> dict[int, MemoryLayer]:
    """The memory layers that insert (``novelty_threshold`` set), by block index.

    Raises:
        ConfigError: there is none, or one inserts the teacher's MLP output (a pack reads without teacher).
    """
    layers = {
        i: layer for i, layer in memory_layers(model).items() if layer.cfg.novelty_threshold is not None
    }
    if not layers:
        raise ConfigError(
            f"student: has no memory layer that inserts (swap.write.novelty_threshold set); "
            f"{INSERTING_EXPERIMENTS} trains one"
        )
    for index, layer in layers.items():
        if layer.cfg.inserted_values == "mlp_output":
            raise ConfigError(
                f"student: the layer of block {index} inserts the teacher MLP's output "
                "(swap.write.inserted_values=mlp_output), which a pack cannot hold without the teacher"
            )
    return layers


def pack_manifest(model: PreTrainedModel, name: str, window: int, stride: int) -> PackManifest:
    """The manifest of an empty pack of ``model`` (loaded from ``name``), read with ``window``/``stride``."""
    return PackManifest(
        student={"fingerprint": weights_fingerprint(model), "name": name},
        layers={str(i): layer.cfg.to_dict() for i, layer in inserting_layers(model).items()},
        reading={"window": window, "stride": stride},
    )


def token_digest(input_ids: torch.Tensor) -> str:
    """SHA-256 of ``input_ids (L,)`` as int64 bytes."""
    return hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()


@torch.no_grad()
def document_entries(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The entries the inserting layers of ``model`` give ``input_ids (L,)``, by block index (as a string):
    ``keys (M, Dk)`` float32, ``values (M, E)`` in the layer's value dtype, ``offsets (M,)`` int64 and
    ``tokens (M,)`` int64, the document's token after each entry's offset.
    The stores are left as they were. ``progress`` is called with the tokens each batch read."""
    layers = inserting_layers(model)
    protocol = memory_protocol(model, deferred=True)
    device = next(model.parameters()).device
    found = {  # each layer's parts, starting from none
        index: {
            "keys": [np.zeros((0, layer.key_dim), np.float32)],
            "values": [np.zeros((0, layer.entry_dim), np.float32)],
            "offsets": [np.zeros(0, np.int64)],
        }
        for index, layer in layers.items()
    }
    spans = windows(input_ids.numel(), window, stride) if input_ids.numel() >= 2 else []
    for start in range(0, len(spans), batch_size):
        chunk = spans[start : start + batch_size]
        ids, mask = window_batch(input_ids.to(device), chunk)  # (B, T) each
        with protocol.collecting(ids) as handed:
            # The decoder alone: the stores are all inside it, and the logits would cost a fifth more.
            model.base_model(input_ids=ids, attention_mask=mask)
        protocol.take_writes()  # the references of the searches: dropped, the stores stay as they were
        begins, ends, firsts = (np.array(column) for column in zip(*chunk, strict=True))
        for index, entries in handed.items():
            for new in entries:
                row, position = np.divmod(new.rows // layers[index].heads, ids.shape[1])
                offset = begins[row] + position  # the token the entry was read at
                # A token gives an entry in the window that scores its successor (perplexity's windows).
                keep = (offset >= firsts[row] - 1) & (offset < ends[row] - 1)
                for name, array in (("keys", new.keys), ("values", new.values), ("offsets", offset)):
                    found[index][name].append(array[keep])
        if progress is not None:
            progress(int(sum(end - first for _, end, first in chunk)))
    document = input_ids.cpu().numpy().astype(np.int64)  # (L,)
    arrays = {}
    for index, parts in found.items():
        offsets = np.concatenate(parts["offsets"]).astype(np.int64)  # (M,)
        arrays[str(index)] = {
            "keys": np.concatenate(parts["keys"]),
            "values": np.concatenate(parts["values"]).astype(layers[index].cfg.value_dtype),
            "offsets": offsets,
            "tokens": document[offsets + 1],  # an entry is read only where its successor is scored
        }
    return arrays


def open_pack(target: Path, fresh: PackManifest, force: bool, keep: Iterable[Path]) -> PackManifest:
    """The pack at ``target`` to add documents to: the one there (made by the same student, settings and
    reading: a rerun resumes it), or a new empty one (the directory must be empty or absent unless
    ``force``)."""
    if is_pack(target) and not force:
        manifest = read_pack(target)
        same_maker(manifest, fresh, f"the pack at {target}", "this student and reading")
        write_manifest(target, manifest)  # removes the shards of an interrupted run
        return manifest
    check_directory_target(target, is_pack, "memory pack", force, keep)

    def write(staging: Path) -> None:
        (staging / SHARDS).mkdir()
        write_manifest(staging, fresh)

    write_directory(target, write)
    return fresh


def memorize(
    model: PreTrainedModel,
    documents: Iterator[tuple[str, torch.Tensor]],
    target: Path,
    manifest: PackManifest,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[PackManifest, int]:
    """Read ``documents`` (name, token ids ``(L,)``) into the pack ``target`` opened with ``manifest``
    (:func:`open_pack`), one shard per document, ``pack.json`` updated after each; documents the pack
    already holds (same name and tokens) are skipped. Returns the final manifest and the documents read.

    Raises:
        PackError: a document of the same name is in the pack with other text.
    """
    window, stride = manifest.reading["window"], manifest.reading["stride"]
    held = {document.name: document.digest for document in manifest.documents}
    read = 0
    for name, input_ids in documents:
        digest = token_digest(input_ids)
        if name in held:
            if held[name] != digest:
                raise PackError(
                    f"{target}: holds a document {name!r} with other text; dmt-forget it first, or write "
                    "another pack"
                )
            if progress is not None:
                progress(input_ids.numel() - 1)
            continue
        arrays = document_entries(model, input_ids, window, stride, batch_size, progress)
        shard = next_shard(manifest)
        write_shard(target, shard, arrays)
        entries = {layer: len(named["offsets"]) for layer, named in arrays.items()}
        document = PackDocument(name, input_ids.numel(), digest, shard, entries)
        manifest = replace(manifest, documents=[*manifest.documents, document])
        write_manifest(target, manifest)
        held[name] = digest
        read += 1
    return manifest, read


def check_pack_fits(model: PreTrainedModel, manifest: PackManifest, pack: Path, student: str) -> None:
    """Refuse a pack made for another student or other layer settings, naming both."""
    fresh = PackManifest(
        student={"fingerprint": weights_fingerprint(model), "name": student},
        layers={
            str(i): layer.cfg.to_dict()
            for i, layer in memory_layers(model).items()
            if str(i) in manifest.layers
        },
        reading=manifest.reading,
    )
    missing = sorted(set(manifest.layers) - set(fresh.layers), key=int)
    if missing:
        raise PackError(
            f"{pack}: holds entries of block(s) {missing}, where student {student} has no memory layer"
        )
    same_maker(manifest, fresh, f"pack {pack}", f"student {student}")


def pack_index(value: Any) -> dict[str, Any] | None:
    """The ``memory_index`` setting as index settings (None stays None); ``ConfigError`` naming it unless
    it is a mapping such as ``{backend: faiss}``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"memory_index: expected index settings such as {{backend: faiss}}, got {value!r}")
    return dict(value)


def read_with(model: PreTrainedModel, settings: Mapping[str, Any] | None) -> None:
    """Give each memory layer of ``model`` the reading settings ``settings`` (``memory_read``, e.g.
    ``{max_distance: 0.05}``; any of :data:`READING_SETTINGS`) that it has, in place of its saved ones
    (a featural layer has no next-token settings); None: as saved. They change how a layer weighs what it
    reads, not what it stores, so any pack of the student reads under them.

    Raises:
        ConfigError: ``settings`` is not a mapping, names another setting or one no memory layer of
            ``model`` has, or gives a value a layer refuses; the error names ``memory_read.<key>``.
    """
    if settings is None:
        return
    if not isinstance(settings, Mapping):
        raise ConfigError(
            f"memory_read: expected reading settings such as {{max_distance: 0.05}}, got {settings!r}"
        )
    for key in settings:
        if key not in READING_SETTINGS:
            raise ConfigError(
                f"memory_read.{key}: not a reading setting; reading settings are {sorted(READING_SETTINGS)}"
            )
    layers = memory_layers(model)
    for key in settings:
        if not any(hasattr(layer.cfg, key) for layer in layers.values()):
            kinds = ", ".join(f"{layer.cfg.type} at block {index}" for index, layer in layers.items())
            raise ConfigError(f"memory_read.{key}: no memory layer of this student has {key} ({kinds})")
    for index, layer in layers.items():
        # A student may mix layer types (featural below an associative cache): each takes the settings
        # it has.
        own = {key: value for key, value in settings.items() if hasattr(layer.cfg, key)}
        try:
            layer.cfg = replace(layer.cfg, **own)
        except ValueError as err:  # the layer's own check, naming swap.read.<key>
            raise ConfigError(f"memory_read: block {index}: {err}") from None


def use_pack(
    model: PreTrainedModel,
    pack: str | Path,
    student: str,
    verify: bool = True,
    index: Mapping[str, Any] | None = None,
) -> PackManifest:
    """Give each memory layer of ``model`` that ``pack`` holds entries for a store of those entries (in
    document order, with room for the layer's ``capacity`` more); returns the pack's manifest.

    ``index``: the key index settings of those stores (``{"backend": "faiss"}`` for a pack of a million
    entries); None: each layer's own, chosen for its own capacity.

    ``{"backend": "disk"}`` (and optionally ``nprobe`` and ``codes`` of :class:`~dmt.packs.disk.DiskPack`):
    search the pack where it lies instead, read-only (the index ``dmt-index PACK`` saved in it, keys and
    values memory-mapped), for a pack larger than RAM.

    Raises:
        PackError: the pack is not one, is corrupt, or was made for another student (``student`` names
            this one) or other layer settings.
    """
    pack = Path(pack)
    manifest = read_pack(pack)
    check_pack_fits(model, manifest, pack, student)
    layers = memory_layers(model)
    raw = manifest.to_json()
    if index is not None and index.get("backend") == DISK:
        settings = {k: v for k, v in index.items() if k != "backend"}
        if set(settings) - {"nprobe", "codes"}:
            raise ConfigError(f"memory_index: backend disk takes nprobe and codes, got {sorted(settings)}")
        for key in manifest.layers:
            with store_errors(PackError):
                try:
                    searched = DiskPack(pack, key, verify=verify, **settings)
                except StoreFileError:
                    raise
                except ValueError as err:  # nprobe or codes
                    raise ConfigError(f"memory_index: {err}") from err
                store = PackStore(searched)
            layers[int(key)].use_store(store)
        return manifest
    for key in manifest.layers:
        layer = layers[int(key)]
        with store_errors(PackError):
            keys, entries, tokens = pack_entries(
                pack, raw, key, layer.key_dim, layer.entry_dim, verify
            )  # (M, Dk), (M, E), (M,)
        try:
            store = layer.empty_store(capacity=len(keys) + layer.cfg.capacity, index=index)
        except ValueError as err:
            if index is None:
                raise
            raise ConfigError(f"memory_index: {err}") from err
        store.insert(keys.numpy(), entries.numpy(), next_tokens=tokens.numpy())
        layer.use_store(store)
    return manifest
