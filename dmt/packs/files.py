"""A memory pack on disk: what a student's inserting memory layers stored while reading a corpus.

A pack is a directory::

    pack.json                  the format version, the student it was made for (a fingerprint of its
                               weights and its name), each layer's settings, how the corpus was read
                               (window, stride), and one record per document: its name, tokens, the
                               SHA-256 of its token ids, its shard and the entries it gave each layer
    shards/<NNNNNN>/           one document's entries: per layer ``layer_XX.keys.npy`` (M, Dk) float32,
                               ``layer_XX.values.npy`` (M, E) in the layer's value dtype and
                               ``layer_XX.offsets.npy`` (M,) int64, the token each entry was read at,
                               ``layer_XX.tokens.npy`` (M,) int64, the document's token after it (what
                               followed the entry's context, read by ``next_token_weight``);
                               ``manifest.json`` records every file's size and SHA-256

Writes are crash-safe: a shard is written aside and renamed into place (:func:`dmt.files.write_directory`),
then ``pack.json`` is replaced atomically to list it (:func:`dmt.files.atomic_file`). A process killed at
any moment leaves either no ``pack.json`` (no pack) or one that lists only complete shards; shards that
it does not list are the leftovers of an interrupted write and are removed by the next write. A pack is
read without pickle (``.npy`` with ``allow_pickle=False``, JSON), and every shard is checked against its
manifest before its arrays are used, by :mod:`dmt.kernel.pack_files`, which an export loaded with plain
``transformers`` reads packs with too.

Entries of one document do not depend on any other document (the student reads each with its own memory,
not the pack's), so packs combine by concatenating their documents (:func:`merge_packs`) and forgetting a
document is dropping its shard (:func:`forget_documents`).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dmt.errors import InputFileError
from dmt.files import atomic_file, write_directory
from dmt.kernel.pack_files import (
    ARRAYS,
    PACK_FORMAT_VERSION,
    PACK_MANIFEST,
    SHARDS,
    array_file,
    read_pack_json,
    stored_settings,
)
from dmt.kernel.store_files import MANIFEST as SHARD_MANIFEST
from dmt.memory.integrity import store_errors, write_array


class PackError(InputFileError):
    """A pack is missing, malformed or corrupt, or does not fit the student it is given to."""


@dataclass(frozen=True)
class PackDocument:
    """One document read into a pack."""

    name: str  # as ``dmt-forget --source`` globs match it: ``source/unit`` or a file's path
    tokens: int  # tokens it was read as
    digest: str  # SHA-256 of its token ids (int64 bytes): the same text read again is recognised
    shard: str  # its directory under ``shards/``
    entries: dict[str, int]  # entries it gave each layer, by block index (a JSON key)


@dataclass(frozen=True)
class PackManifest:
    """What ``pack.json`` says (module docstring)."""

    # {"fingerprint": SHA-256 of the student's weights, "name": what it was loaded from}
    student: dict[str, str]
    layers: dict[str, dict[str, Any]]  # block index → the layer's settings (LayerConfig.to_dict())
    reading: dict[str, int]  # {"window": ..., "stride": ...}
    documents: list[PackDocument] = field(default_factory=list)
    format_version: int = PACK_FORMAT_VERSION

    def entries(self) -> dict[str, int]:
        """Entries per layer, by block index."""
        return {layer: sum(d.entries.get(layer, 0) for d in self.documents) for layer in self.layers}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_pack(directory: Path) -> bool:
    """Whether ``directory`` holds a pack (its ``pack.json`` exists)."""
    return (directory / PACK_MANIFEST).is_file()


def read_pack(directory: str | Path) -> PackManifest:
    """The manifest of the pack ``directory``, checked for shape (its shards are checked as they are read:
    :func:`dmt.kernel.pack_files.read_shard`).

    Raises:
        PackError: naming the directory or ``pack.json`` when it is not a pack of this format.
    """
    directory = Path(directory)
    with store_errors(PackError):
        raw = read_pack_json(directory)
    try:
        documents = [PackDocument(**document) for document in raw["documents"]]
        manifest = PackManifest(
            student=dict(raw["student"]),
            layers={str(k): dict(v) for k, v in raw["layers"].items()},
            reading={str(k): int(v) for k, v in raw["reading"].items()},
            documents=documents,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PackError(f"{directory / PACK_MANIFEST}: malformed ({err!r})") from err
    for document in documents:
        if Path(document.shard).name != document.shard or not document.shard.isdigit():
            raise PackError(f"{directory / PACK_MANIFEST}: {document.shard!r} is not a shard name")
    return manifest


def write_manifest(directory: Path, manifest: PackManifest) -> None:
    """Replace ``pack.json`` atomically, then remove shards it does not list (interrupted writes)."""
    with atomic_file(directory / PACK_MANIFEST, "w") as handle:
        json.dump(manifest.to_json(), handle, indent=1)
    listed = {document.shard for document in manifest.documents}
    shards = directory / SHARDS
    for path in shards.iterdir() if shards.is_dir() else ():
        if path.name not in listed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def next_shard(manifest: PackManifest) -> str:
    """A shard name that no document of ``manifest`` uses."""
    used = [int(document.shard) for document in manifest.documents]
    return f"{max(used, default=-1) + 1:06d}"


def write_shard(directory: Path, shard: str, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write one document's ``arrays`` (block index → ``keys``, ``values``, ``offsets``, ``tokens``) as
    ``shard``."""

    def write(staging: Path) -> None:
        files = {
            array_file(layer, name): write_array(staging / array_file(layer, name), named[name])
            for layer, named in arrays.items()
            for name in ARRAYS
        }
        (staging / SHARD_MANIFEST).write_text(
            json.dumps({"format_version": PACK_FORMAT_VERSION, "files": files})
        )

    write_directory(directory / SHARDS / shard, write)


def matching(documents: Iterable[PackDocument], patterns: Iterable[str]) -> list[PackDocument]:
    """The documents whose name matches any of the shell-style ``patterns`` (``fnmatch``)."""
    patterns = list(patterns)
    return [d for d in documents if any(fnmatch.fnmatchcase(d.name, p) for p in patterns)]


def forget_documents(directory: str | Path, patterns: Iterable[str]) -> list[PackDocument]:
    """Remove from the pack ``directory`` every document whose name matches ``patterns``, with all the
    entries it gave; returns the documents removed. ``pack.json`` is rewritten first, so a crash leaves the
    pack either as it was or without them."""
    directory = Path(directory)
    manifest = read_pack(directory)
    removed = matching(manifest.documents, patterns)
    kept = [d for d in manifest.documents if d not in removed]
    if removed:
        write_manifest(directory, replace(manifest, documents=kept))
    return removed


def same_maker(a: PackManifest, b: PackManifest, a_name: str, b_name: str) -> None:
    """Refuse two packs (or a pack and a student's reading, as manifests) made for different students,
    layer settings or readings, naming both."""
    if a.student["fingerprint"] != b.student["fingerprint"]:
        raise PackError(
            f"{a_name} was made for student {a.student['name']} (weights {a.student['fingerprint'][:12]}), "
            f"{b_name} for student {b.student['name']} (weights {b.student['fingerprint'][:12]})"
        )
    for what in ("layers", "reading"):
        if compared(a, what) != compared(b, what):
            raise PackError(
                f"{a_name} and {b_name} differ in their {what}: {settings_difference(a, b, what)}"
            )


def compared(manifest: PackManifest, what: str) -> dict[str, Any]:
    """``manifest``'s ``layers`` (each as :func:`stored_settings`) or ``reading``, flat (``29.key_dim``):
    what two makers of packs must agree on."""
    if what == "layers":
        return flat({index: stored_settings(layer) for index, layer in manifest.layers.items()})
    return flat(manifest.reading)


def settings_difference(a: PackManifest, b: PackManifest, what: str) -> str:
    """The first keys in which ``a`` and ``b`` differ, as ``key: a-value vs b-value``."""
    left, right = compared(a, what), compared(b, what)
    keys = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k))
    return "; ".join(f"{k}: {left.get(k)!r} vs {right.get(k)!r}" for k in keys[:4])


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"29": {"topk": 32}}`` as ``{"29.topk": 32}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge_packs(
    sources: list[Path], target: Path, on_document: Callable[[PackDocument], None] | None = None
) -> PackManifest:
    """Write one pack at ``target`` holding every document of ``sources`` (packs of one student, layer
    settings and reading), in order; a document already taken (same name and token digest) is skipped,
    one of the same name with other text is refused. Shards are copied; ``target`` is written aside and
    renamed into place."""
    manifests = [read_pack(source) for source in sources]
    for manifest, source in zip(manifests[1:], sources[1:], strict=True):
        same_maker(manifests[0], manifest, str(sources[0]), str(source))
    merged = replace(manifests[0], documents=[])
    seen: dict[str, str] = {}

    def write(staging: Path) -> None:
        nonlocal merged
        (staging / SHARDS).mkdir()
        for source, manifest in zip(sources, manifests, strict=True):
            for document in manifest.documents:
                if seen.get(document.name) == document.digest:
                    continue
                if document.name in seen:
                    raise PackError(
                        f"{source}: document {document.name!r} has other text than the one of that name "
                        "in an earlier pack"
                    )
                seen[document.name] = document.digest
                shard = next_shard(merged)
                shutil.copytree(source / SHARDS / document.shard, staging / SHARDS / shard)
                merged = replace(merged, documents=[*merged.documents, replace(document, shard=shard)])
                if on_document is not None:
                    on_document(document)
        (staging / PACK_MANIFEST).write_text(json.dumps(merged.to_json(), indent=1))

    write_directory(target, write)
    return merged
