"""A pack searched where it lies: its keys filed in a faiss inverted file, its values read from the shards
memory-mapped, so a pack larger than RAM answers a memory layer's queries.

:func:`index_pack` files one layer's keys once (k-means centroids and each entry's list) and saves the
result beside the shards::

    index/layer_XX.centroids.npy   (nlist, Dk) float32: k-means centroids of the keys
    index/layer_XX.lists.npy       (M,) int32: each entry's list, in pack order
    index/manifest.json            each file's size and SHA-256, and per layer its metric and the
                                   SHA-256 of pack.json's document list it was made from

:class:`DiskPack` opens it: the keys are read shard by shard with plain reads (the page cache keeps them,
not the process) into an ``IndexIVFFlat`` whose quantiser holds the saved centroids and whose lists the
saved assignment (``add_core`` with precomputed lists: no k-means and no quantiser pass at opening); the
values stay in their shards, memory-mapped, and only the rows a search returns are read. What stays
resident is the filed keys (``4 · Dk + 8`` bytes an entry) and the pages of values read.

faiss parses no file of ours: the index is rebuilt from ``.npy`` arrays (no pickle) checked for shape and
range first, so a malformed index file is a named error, never a crash in native code. An index is tied to
the documents it filed: merging or forgetting rewrites pack.json's document list, and an index made for
another list is refused (index the pack again).
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dmt.files import write_directory
from dmt.kernel.pack_files import SHARDS, read_pack_json, read_shard
from dmt.kernel.store_files import MANIFEST, StoreFileError, read_manifest, verify_files
from dmt.memory.faiss_ivf import SAMPLE_PER_LIST, SEED, TIE_TOLERANCE, calibrated_nprobe, derived_nlist
from dmt.memory.integrity import write_array
from dmt.memory.metrics import check_metric

INDEX = "index"  # the pack's subdirectory holding its layers' inverted-file indexes
# Queries (the first search's) on which nprobe is calibrated when it is not given.
CALIBRATION_QUERIES = 512


def index_file(block: str, name: str) -> str:
    """The file of array ``name`` (``centroids`` or ``lists``) of the layer of block ``block``."""
    return f"layer_{int(block):02d}.{name}.npy"


def documents_digest(raw: dict[str, Any]) -> str:
    """SHA-256 of the document list of a parsed ``pack.json``: what an index was made from."""
    return hashlib.sha256(json.dumps(raw["documents"], sort_keys=True).encode()).hexdigest()


def layer_shards(pack: Path, raw: dict[str, Any], block: str) -> Iterator[tuple[Path, int]]:
    """Each document's shard directory and its entry count for the layer of block ``block``."""
    for document in raw["documents"]:
        shard = str(document["shard"])
        if Path(shard).name != shard or not shard.isdigit():
            raise StoreFileError(f"{pack}/pack.json: {shard!r} is not a shard name")
        yield pack / SHARDS / shard, int(document["entries"].get(block, 0))


def read_keys(shard: Path, block: str, count: int, verify: bool) -> np.ndarray:
    """``(M, Dk)`` float32 keys of one shard, read (not mapped)."""
    keys = read_shard(shard, block, count, None, None, verify, names=("keys",))["keys"]
    return np.ascontiguousarray(keys, dtype=np.float32)


def filed(keys: np.ndarray, metric: str) -> np.ndarray:
    """``keys (M, Dk)`` as the index files them: unit length for cosine (inner product ranks them)."""
    if metric == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(keys, dtype=np.float32)


def empty_ivf(centroids: np.ndarray, metric: str) -> faiss.IndexIVFFlat:
    """An ``IndexIVFFlat`` with ``centroids (nlist, Dk)`` as its trained quantiser and no keys."""
    nlist, dim = centroids.shape
    ip = metric != "l2"
    quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    ivf.is_trained = True
    ivf.own_fields = True  # the index frees the quantiser
    quantizer.this.disown()
    return ivf


def index_pack(pack: str | Path, block: str | int, metric: str, nlist: int | None = None) -> Path:
    """File the keys of the layer of block ``block`` in ``pack`` under ``nlist`` k-means centroids
    (None: the power of two nearest ``4 · sqrt(M)``, as :func:`~dmt.memory.faiss_ivf.derived_nlist`),
    trained on at most ``SAMPLE_PER_LIST · nlist`` keys spread over the documents; writes ``index/``
    (replacing an earlier index of that layer, keeping the others) and returns it."""
    pack, block = Path(pack), str(int(block))
    check_metric(metric)
    raw = read_pack_json(pack)
    shards = list(layer_shards(pack, raw, block))
    total = sum(count for _, count in shards)
    if total == 0:
        raise StoreFileError(f"{pack}: no entries of block {block} to index")
    nlist = nlist or derived_nlist(total)
    step = max(1, total // (SAMPLE_PER_LIST * nlist))

    # Train: k-means on every step-th key.
    sample = np.concatenate([filed(read_keys(s, block, n, True), metric)[::step] for s, n in shards])
    ip = metric != "l2"
    quantizer = faiss.IndexFlatIP(sample.shape[1]) if ip else faiss.IndexFlatL2(sample.shape[1])
    ivf = faiss.IndexIVFFlat(
        quantizer, sample.shape[1], nlist, faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    )
    ivf.cp.seed = SEED
    ivf.train(sample)
    centroids = quantizer.reconstruct_n(0, nlist)  # (nlist, Dk)

    # Assign: each key's nearest centroid, shard by shard.
    lists = np.concatenate(
        [quantizer.assign(filed(read_keys(s, block, n, False), metric), 1)[:, 0] for s, n in shards]
    )

    target = pack / INDEX
    previous = read_manifest(target) if (target / MANIFEST).is_file() else {"files": {}, "layers": {}}

    def write(staging: Path) -> None:
        files = {
            name: record
            for name, record in previous["files"].items()
            if not name.startswith(f"layer_{int(block):02d}.")
        }
        for name in files:
            (staging / name).write_bytes((target / name).read_bytes())
        files[index_file(block, "centroids")] = write_array(
            staging / index_file(block, "centroids"), centroids
        )
        files[index_file(block, "lists")] = write_array(
            staging / index_file(block, "lists"), lists.astype(np.int32)
        )
        layers = {
            **previous["layers"],
            block: {"metric": metric, "nlist": nlist, "documents": documents_digest(raw)},
        }
        (staging / MANIFEST).write_text(json.dumps({"files": files, "layers": layers}, indent=1))

    return write_directory(target, write)


class DiskPack:
    """One layer's entries of a pack, searched by the pack's saved index and read from its shards.

    Args:
        pack: the pack directory (``index_pack`` has indexed the layer).
        block: the block index of the layer whose entries are searched.
        nprobe: lists a query visits; None calibrates it on the first search's queries (at most
            :data:`CALIBRATION_QUERIES`) for recall@k >= ``CALIBRATION_RECALL`` of ``dmt.memory.faiss_ivf``
            against visiting every list (exact for a flat inverted file).
        in_ram: read the values into memory instead of mapping them (what a pack held in RAM costs).
        verify: check every file's SHA-256 against its manifest (a full read of the pack), not only sizes.

    Raises:
        StoreFileError: naming the file or setting when the pack, a shard or the index is missing,
            changed, malformed or made for another document list.
    """

    def __init__(
        self,
        pack: str | Path,
        block: str | int,
        nprobe: int | None = None,
        in_ram: bool = False,
        verify: bool = True,
    ) -> None:
        self.pack, self.block = Path(pack), str(int(block))
        raw = read_pack_json(self.pack)
        shards = list(layer_shards(self.pack, raw, self.block))
        centroids, lists = self._read_index(raw, sum(count for _, count in shards), verify)
        self.nlist, self.dim = centroids.shape
        self.ivf = empty_ivf(centroids, self.metric)
        self.nprobe = None if nprobe is None else min(int(nprobe), self.nlist)
        self.calibrated_recall: float | None = None

        # Keys: filed list by precomputed list, shard by shard; values: mapped (or read) per shard.
        self.values: list[np.ndarray] = []
        starts = [0]
        for shard, count in shards:
            keys = filed(read_keys(shard, self.block, count, verify), self.metric)  # (M, Dk)
            ids = np.arange(starts[-1], starts[-1] + count, dtype=np.int64)
            assigned = np.ascontiguousarray(lists[ids], dtype=np.int64)
            self.ivf.add_core(count, faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))
            arrays = read_shard(
                shard, self.block, count, self.dim, None, verify, names=("values",), mmap=not in_ram
            )
            if isinstance(arrays["values"], np.memmap):
                # A search reads scattered rows: no readahead, or every row read pulls its neighbours in.
                arrays["values"]._mmap.madvise(mmap.MADV_RANDOM)
            self.values.append(arrays["values"])
            starts.append(starts[-1] + count)
        self.starts = np.asarray(starts, dtype=np.int64)  # (S + 1,): entry id where each shard begins

    def _read_index(self, raw: dict[str, Any], total: int, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        """The layer's checked ``centroids (nlist, Dk)`` and ``lists (M,)``."""
        directory = self.pack / INDEX
        where = f"{directory}/{MANIFEST}"
        if not (directory / MANIFEST).is_file():
            raise StoreFileError(
                f"{self.pack}: no {INDEX}/ (index the pack first: dmt.packs.disk.index_pack)"
            )
        manifest = read_manifest(directory)
        layer = (
            manifest.get("layers", {}).get(self.block) if isinstance(manifest.get("layers"), dict) else None
        )
        if not isinstance(layer, dict):
            raise StoreFileError(f"{where}: block {self.block} is not indexed")
        if layer.get("documents") != documents_digest(raw):
            raise StoreFileError(
                f"{where}: made for another document list than pack.json's (the pack was merged or "
                "forgotten since): index it again"
            )
        self.metric = check_metric(layer.get("metric"))
        names = [index_file(self.block, "centroids"), index_file(self.block, "lists")]
        verify_files(directory, manifest.get("files"), names, checksums=verify)
        arrays = []
        for name in names:
            try:
                arrays.append(np.load(directory / name, allow_pickle=False))
            except (OSError, ValueError, EOFError) as err:
                raise StoreFileError(f"{directory / name}: not a readable .npy array ({err})") from err
        centroids, lists = arrays
        if centroids.ndim != 2 or centroids.dtype != np.float32 or not np.isfinite(centroids).all():
            raise StoreFileError(f"{directory / names[0]}: expected finite float32 (nlist, Dk) centroids")
        nlist = len(centroids)
        if (
            lists.shape != (total,)
            or lists.dtype != np.int32
            or (total and not 0 <= lists.min() <= lists.max() < nlist)
        ):
            raise StoreFileError(
                f"{directory / names[1]}: expected int32 ({total},) lists in [0, {nlist}), "
                f"got {lists.dtype} {lists.shape}"
            )
        return centroids, lists

    def __len__(self) -> int:
        return int(self.ivf.ntotal)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Entry ids ``(N, k)`` (-1 past the entries) and scores ``(N, k)`` (faiss's: inner product for
        ip and cosine, squared distance for l2) of the ``k`` nearest keys to ``queries (N, Dk)``."""
        queries = filed(np.asarray(queries, dtype=np.float32), self.metric)
        k = min(k, len(self))
        if nprobe is None and self.nprobe is None:
            self.calibrate(queries, k)
        self.ivf.nprobe = nprobe or self.nprobe
        scores, ids = self.ivf.search(queries, k)
        return ids, scores

    def calibrate(self, queries: np.ndarray, k: int) -> None:
        """Set nprobe as :class:`~dmt.memory.faiss_ivf.FaissIndex` does, against every list visited."""
        sample = queries[:: max(1, len(queries) // CALIBRATION_QUERIES)][:CALIBRATION_QUERIES]
        self.ivf.nprobe = self.nlist
        exact, _ = self.ivf.search(sample, k)  # (n, k) scores
        sign = 1.0 if self.metric == "l2" else -1.0  # distances grow with the score for l2 only
        bound = sign * exact[:, -1:] + TIE_TOLERANCE  # (n, 1)

        def recall(nprobe: int) -> float:
            self.ivf.nprobe = nprobe
            return float((sign * self.ivf.search(sample, k)[0] <= bound).mean())

        self.nprobe, self.calibrated_recall = calibrated_nprobe(recall, self.nlist)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Values ``(*ids.shape, E)`` float32 of entry ``ids`` (-1 reads zeros), gathered shard by shard."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out = np.zeros((len(flat), self.values[0].shape[1]), np.float32)
        shard = np.searchsorted(self.starts, flat, side="right") - 1  # (N·k,)
        for s in np.unique(shard[flat >= 0]):
            rows = np.flatnonzero((shard == s) & (flat >= 0))
            order = np.argsort(flat[rows])  # ascending offsets: sequential reads of a mapped file
            out[rows[order]] = self.values[s][flat[rows[order]] - self.starts[s]]
        return out.reshape(*np.shape(ids), -1)
