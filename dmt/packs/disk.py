"""A pack searched where it lies: its keys filed in a faiss inverted file, its keys and values read from the
shards memory-mapped, so a pack larger than RAM answers a memory layer's queries.

:func:`index_pack` (``dmt-index PACK``) files a layer's keys once, k-means centroids and each entry's
list, and saves the result beside the shards::

    index/layer_XX.centroids.npy   (nlist, Dk) float32: k-means centroids of the keys
    index/layer_XX.lists.npy       (M,) int32: each entry's list, document after document
    index/manifest.json            each file's size and SHA-256; per layer its metric, nlist and the
                                   documents it filed, in order: [shard, token digest, entries]

:class:`DiskPack` opens it: the keys are read shard by shard with plain reads (the page cache keeps them,
not the process) into a faiss inverted file (keys as float16 by default) whose quantiser holds the saved
centroids and whose lists the saved assignment (``add_core`` with precomputed lists: no k-means and no
quantiser pass at opening); keys and values stay in their shards, memory-mapped without readahead, and
only the rows a search returns are read. What stays resident is the filed keys (``2 · Dk + 8`` bytes an
entry as float16) and the pages of the rows read.
:class:`PackStore` puts it behind a memory layer, read-only: ``memory_index={backend: disk}`` of
``dmt-eval``/``dmt-long-document`` (``use_pack(..., index={"backend": "disk"})``).

faiss parses no file of ours: the index is rebuilt from ``.npy`` arrays (no pickle) checked for shape and
range first, so a malformed index file is a named error, never a crash in native code. An index stays
valid when documents are forgotten (each document's lists are a slice of the file); a document it did not
file (a merge, a resumed ``dmt-memorize``) is refused until the pack is indexed again.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from dmt.files import write_directory
from dmt.kernel.pack_files import SHARDS, read_pack_json, read_shard
from dmt.kernel.store_files import MANIFEST, StoreFileError, read_manifest, verify_files
from dmt.memory.base import MemoryStats
from dmt.memory.faiss_ivf import SAMPLE_PER_LIST, SEED, derived_nlist
from dmt.memory.integrity import write_array
from dmt.memory.metrics import check_metric
from dmt.memory.trained import TIE_TOLERANCE, calibrated_breadth

DISK = "disk"  # the memory_index backend that reads a pack where it lies
INDEX = "index"  # the pack's subdirectory holding its layers' inverted-file indexes
# Queries (the first search's) on which nprobe is calibrated when it is not given.
CALIBRATION_QUERIES = 512


def index_file(block: str, name: str) -> str:
    """The file of array ``name`` (``centroids`` or ``lists``) of the layer of block ``block``."""
    return f"layer_{int(block):02d}.{name}.npy"


def layer_documents(pack: Path, raw: dict[str, Any], block: str) -> Iterator[tuple[Path, str, int]]:
    """Each document's shard directory, token digest and entry count for the layer of block ``block``."""
    for document in raw["documents"]:
        shard = str(document["shard"])
        if Path(shard).name != shard or not shard.isdigit():
            raise StoreFileError(f"{pack}/pack.json: {shard!r} is not a shard name")
        yield pack / SHARDS / shard, str(document["digest"]), int(document["entries"].get(block, 0))


def read_keys(shard: Path, block: str, count: int, verify: bool) -> np.ndarray:
    """``(M, Dk)`` float32 keys of one shard, read (not mapped)."""
    keys = read_shard(shard, block, count, None, None, verify, names=("keys",))["keys"]
    return np.ascontiguousarray(keys, dtype=np.float32)


def filed(keys: np.ndarray, metric: str) -> np.ndarray:
    """``keys (M, Dk)`` as the index files them: unit length for cosine (inner product ranks them)."""
    if metric == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(keys, dtype=np.float32)


def inverted_file(
    dim: int, nlist: int, metric: str, codes: str = "float32"
) -> tuple[faiss.IndexIVF, faiss.IndexFlat]:
    """An empty inverted file of ``nlist`` lists for ``metric`` (cosine: inner product of unit keys) and
    its quantiser (kept alive by the caller): ``IndexIVFFlat`` for ``codes`` float32, or keys held as
    float16 (``IndexIVFScalarQuantizer`` QT_fp16, no residuals: half the bytes, nothing to train)."""
    ip = metric != "l2"
    faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
    if codes == "float32":
        return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric), quantizer
    if codes != "float16":
        raise ValueError(f"codes: expected float32 or float16, got {codes!r}")
    fp16 = faiss.ScalarQuantizer.QT_fp16
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, fp16, faiss_metric, False)
    return ivf, quantizer


def index_pack(pack: str | Path, block: str | int, nlist: int | None = None) -> Path:
    """File the keys of the layer of block ``block`` in ``pack`` under ``nlist`` k-means centroids
    (None: the power of two nearest ``4 · sqrt(M)``, as :func:`~dmt.memory.faiss_ivf.derived_nlist`),
    trained on at most ``SAMPLE_PER_LIST · nlist`` keys spread over the documents, in the layer's
    metric; writes ``index/`` (replacing an earlier index of that layer, keeping the others) and
    returns it."""
    pack, block = Path(pack), str(int(block))
    raw = read_pack_json(pack)
    if block not in raw["layers"]:
        raise StoreFileError(f"{pack}: holds no entries of block {block} (it has {sorted(raw['layers'])})")
    metric = raw["layers"][block].get("metric")
    if metric is None:
        raise StoreFileError(f"{pack}/pack.json: block {block} records no metric to file its keys by")
    check_metric(metric)
    documents = [d for d in layer_documents(pack, raw, block) if d[2]]
    total = sum(count for _, _, count in documents)
    if total == 0:
        raise StoreFileError(f"{pack}: no entries of block {block} to index")
    nlist = nlist or derived_nlist(total)
    step = max(1, total // (SAMPLE_PER_LIST * nlist))

    # Train: k-means on every step-th key.
    sample = np.concatenate([filed(read_keys(s, block, n, True), metric)[::step] for s, _, n in documents])
    ivf, quantizer = inverted_file(sample.shape[1], nlist, metric)
    ivf.cp.seed = SEED
    ivf.train(sample)
    centroids = quantizer.reconstruct_n(0, nlist)  # (nlist, Dk)

    # Assign: each key's nearest centroid, shard by shard.
    lists = [quantizer.assign(filed(read_keys(s, block, n, False), metric), 1)[:, 0] for s, _, n in documents]

    target = pack / INDEX
    previous = read_manifest(target) if (target / MANIFEST).is_file() else {"files": {}, "layers": {}}
    names = {name: index_file(block, name) for name in ("centroids", "lists")}

    def write(staging: Path) -> None:
        files = {name: record for name, record in previous["files"].items() if name not in names.values()}
        for name in files:
            (staging / name).write_bytes((target / name).read_bytes())
        files[names["centroids"]] = write_array(staging / names["centroids"], centroids)
        files[names["lists"]] = write_array(staging / names["lists"], np.concatenate(lists).astype(np.int32))
        filed_documents = [[s.name, digest, n] for s, digest, n in documents]
        layer = {"metric": metric, "nlist": nlist, "documents": filed_documents}
        layers = {**previous["layers"], block: layer}
        (staging / MANIFEST).write_text(json.dumps({"files": files, "layers": layers}, indent=1))

    return write_directory(target, write)


def mapped_rows(array: np.ndarray) -> np.ndarray:
    """A memory-mapped ``array`` advised to the kernel as read at random: a search reads scattered rows,
    and readahead would pull each one's neighbours in with it."""
    array._mmap.madvise(mmap.MADV_RANDOM)  # np.memmap's mapping (numpy has no public handle on it)
    return array


class DiskPack:
    """One layer's entries of a pack, searched by the pack's saved index and read from its shards.

    Args:
        pack: the pack directory (``index_pack`` has indexed the layer).
        block: the block index of the layer whose entries are searched.
        nprobe: lists a query visits; None calibrates it on the first search's queries (at most
            :data:`CALIBRATION_QUERIES`) for recall@k >= ``CALIBRATION_RECALL`` of ``dmt.memory.faiss_ivf``
            against visiting every list (exact for a flat inverted file).
        in_ram: read keys and values into memory instead of mapping them (what a pack held in RAM costs).
        verify: check every file's SHA-256 against its manifest (a full read of the pack), not only sizes.
        codes: how the inverted file holds the keys it ranks: ``float16`` (half the resident bytes) or
            ``float32``; the keys a search returns are read from the shards as stored either way.

    Raises:
        StoreFileError: naming the file or setting when the pack, a shard or the index is missing,
            changed, malformed, or does not cover the pack's documents.
    """

    def __init__(
        self,
        pack: str | Path,
        block: str | int,
        nprobe: int | None = None,
        in_ram: bool = False,
        verify: bool = True,
        codes: str = "float16",
    ) -> None:
        self.pack, self.block = Path(pack), str(int(block))
        raw = read_pack_json(self.pack)
        documents = [d for d in layer_documents(self.pack, raw, self.block) if d[2]]
        if not documents:
            raise StoreFileError(f"{self.pack}: holds no entries of block {self.block}")
        centroids, lists = self._read_index(documents, verify)
        self.nlist, self.dim = centroids.shape
        self.ivf, quantizer = inverted_file(self.dim, self.nlist, self.metric, codes)
        quantizer.add(centroids)
        self.ivf.is_trained = True
        self._quantizer = quantizer  # the index holds only a pointer to it
        # Each list sized once for all its entries: grown shard by shard, faiss's vectors would double
        # and leave freed blocks behind (about 1.5 times the keys' bytes resident at ten million).
        lists_of = faiss.downcast_InvertedLists(self.ivf.invlists)
        for number, count in enumerate(np.bincount(np.concatenate(lists), minlength=self.nlist).tolist()):
            lists_of.resize(number, count)
            lists_of.resize(number, 0)  # empty again, its room kept
        self.nprobe = None if nprobe is None else min(int(nprobe), self.nlist)
        self.calibrated_recall: float | None = None

        # Keys: filed by their saved lists, shard by shard; keys and values: mapped (or read) per shard.
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        starts = [0]
        for (shard, _, count), assigned in zip(documents, lists, strict=True):
            keys = filed(read_keys(shard, self.block, count, verify), self.metric)  # (M, Dk)
            ids = np.arange(starts[-1], starts[-1] + count, dtype=np.int64)
            assigned = np.ascontiguousarray(assigned, dtype=np.int64)
            self.ivf.add_core(count, faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))
            arrays = read_shard(
                shard,
                self.block,
                count,
                self.dim,
                None,
                False,
                names=("keys", "values", "tokens"),
                mmap=not in_ram,
            )
            self.keys.append(arrays["keys"] if in_ram else mapped_rows(arrays["keys"]))
            self.values.append(arrays["values"] if in_ram else mapped_rows(arrays["values"]))
            self.tokens.append(arrays["tokens"] if in_ram else mapped_rows(arrays["tokens"]))
            starts.append(starts[-1] + count)
        self.starts = np.asarray(starts, dtype=np.int64)  # (S + 1,): entry id where each shard begins
        self.value_dim = int(self.values[0].shape[1])

    def _read_index(
        self, documents: list[tuple[Path, str, int]], verify: bool
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The layer's checked ``centroids (nlist, Dk)`` and each document's slice of its lists."""
        directory = self.pack / INDEX
        where = directory / MANIFEST
        if not where.is_file():
            raise StoreFileError(f"{self.pack}: not indexed (no {INDEX}/): run dmt-index {self.pack}")
        manifest = read_manifest(directory)
        layers = manifest.get("layers")
        layer = layers.get(self.block) if isinstance(layers, dict) else None
        try:
            self.metric = check_metric(layer["metric"])
            ranges, start = {}, 0
            for shard, digest, count in layer["documents"]:
                ranges[(str(shard), str(digest))] = (start, int(count))
                start += int(count)
        except (TypeError, KeyError, ValueError) as err:
            raise StoreFileError(f"{where}: block {self.block} missing or malformed ({err!r})") from err
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
        if (
            lists.shape != (start,)
            or lists.dtype != np.int32
            or (start and not 0 <= lists.min() <= lists.max() < len(centroids))
        ):
            raise StoreFileError(
                f"{directory / names[1]}: expected int32 ({start},) lists in [0, {len(centroids)}), "
                f"got {lists.dtype} {lists.shape}"
            )
        slices = []
        for shard, digest, count in documents:
            begin, filed_count = ranges.get((shard.name, digest), (0, -1))
            if filed_count != count:
                raise StoreFileError(
                    f"{where}: shard {shard.name} was not indexed (added since): run dmt-index {self.pack}"
                )
            slices.append(lists[begin : begin + count])
        return centroids, slices

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

        self.nprobe, self.calibrated_recall = calibrated_breadth(recall, self.nlist)

    def by_shard(self, flat: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """For entry ids ``flat (M,)`` (-1: none), each shard ``s`` holding some of them, with their positions
        in ``flat`` and their rows in the shard, in ascending order (sequential reads of each mapped file)."""
        shard = np.searchsorted(self.starts, flat, side="right") - 1  # (M,)
        for s in np.unique(shard[flat >= 0]):
            rows = np.flatnonzero((shard == s) & (flat >= 0))
            rows = rows[np.argsort(flat[rows])]
            yield s, rows, flat[rows] - self.starts[s]

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(*ids.shape, Dk)`` and values ``(*ids.shape, E)``, float32, of entry ``ids`` (-1 reads
        zeros), gathered shard by shard."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        keys = np.zeros((len(flat), self.dim), np.float32)
        values = np.zeros((len(flat), self.value_dim), np.float32)
        for s, rows, in_shard in self.by_shard(flat):
            keys[rows] = self.keys[s][in_shard]
            values[rows] = self.values[s][in_shard]
        return keys.reshape(*np.shape(ids), -1), values.reshape(*np.shape(ids), -1)

    def next_tokens(self, ids: np.ndarray) -> np.ndarray:
        """``(...)`` int64: the next token of each of entry ``ids (...)`` (-1 for -1), shard by shard."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        tokens = np.full(len(flat), -1, np.int64)
        for s, rows, in_shard in self.by_shard(flat):
            tokens[rows] = self.tokens[s][in_shard]
        return tokens.reshape(np.shape(ids))

    def recall(self, queries: np.ndarray, k: int) -> float:
        """Recall@k of :meth:`search` against visiting every list, for ``queries (N, Dk)``."""
        found, truth = self.search(queries, k)[0], self.search(queries, k, nprobe=self.nlist)[0]
        return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


class PackStore:
    """A pack on disk behind a memory layer (:meth:`MemoryLayer.use_store`), read-only.

    It answers what a layer asks of its store while it reads: search (distances in the metric's
    convention of :mod:`dmt.memory.metrics`), the returned keys and entries, references (counted as
    reads) and recall; it stays on the host whatever the layer's device. Inserts, value updates and
    recombining are refused: a pack on disk is read, not trained (load it into RAM to write).
    """

    # Its rows lie in many mapped shards: a layer gathers the entries it reads (get_tensors).
    has_tables = False

    def __init__(self, pack: DiskPack) -> None:
        self.pack = pack
        self.key_dim, self.value_dim, self.metric = pack.dim, pack.value_dim, pack.metric
        self.capacity = len(pack)
        self._stats = MemoryStats()
        self.now = 0  # the clock: queries referenced so far

    def __len__(self) -> int:
        return len(self.pack)

    @property
    def stats(self) -> MemoryStats:
        return replace(self._stats, entries=len(self))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> PackStore:
        """Stays on the host (its keys are filed in faiss-cpu, its rows mapped from disk)."""
        return self

    def search(
        self, queries: np.ndarray, k: int, by_magnitude: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``(N, k)`` (-1 padding) and distances ``(N, k)`` (+inf padding) of the nearest entries."""
        if by_magnitude:
            raise ValueError(f"{self.pack.pack}: a pack on disk ranks by score, not by magnitude")
        ids, scores = self.pack.search(queries, k)
        self._stats.queries += len(ids)
        distances = scores if self.metric == "l2" else 1.0 - scores
        return ids, np.where(ids >= 0, distances, np.inf).astype(np.float32)

    def search_torch(
        self, queries: torch.Tensor, k: int, by_magnitude: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, distances = self.search(queries.detach().float().cpu().numpy(), k, by_magnitude)
        return torch.from_numpy(ids), torch.from_numpy(distances)

    def get_tensors(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(M, Dk)`` and entries ``(M, E)`` float32 of ``ids (M,)``."""
        keys, values = self.pack.get(ids)
        return torch.from_numpy(keys), torch.from_numpy(values)

    def reference(self, ids: np.ndarray) -> None:
        rows = np.asarray(ids)
        self._stats.reads += int(np.count_nonzero(rows >= 0))
        self.now += 1 if rows.ndim == 1 else len(rows)

    def next_tokens(self, ids: np.ndarray) -> np.ndarray:
        """The token after each of ``ids (...)`` in its document (-1 for -1), as the pack recorded it."""
        return self.pack.next_tokens(ids)

    def insertion_times(self, ids: np.ndarray) -> np.ndarray:
        """Every entry predates any run: zeros ``(M,)``."""
        return np.zeros(len(ids), np.int64)

    def recall(self, queries: np.ndarray, k: int, by_magnitude: bool = False) -> float:
        return self.pack.recall(queries, k) if len(queries) else float("nan")

    def _read_only(self, *args: Any) -> None:
        raise ValueError(
            f"{self.pack.pack}: a pack on disk is read-only (load it without memory_index backend disk "
            "to write)"
        )

    insert = update_values = recombine = _read_only
