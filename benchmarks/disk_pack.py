"""Ten million entries searched where they lie (``dmt.packs.disk``), against the same pack held in RAM.

python -m benchmarks.disk_pack make OUT --keys KEYS_PACK [--block 29 --entries 10000000 --documents 100]
python -m benchmarks.disk_pack measure OUT --queries HELD_OUT_PACK [--out results/bench/disk_pack.json]

``make`` writes a pack of ``--entries`` entries in ``--documents`` shards for the layer of ``--block``, from
the real keys and values of ``KEYS_PACK`` (what a student stored while reading text): entry ``i`` is entry
``i mod B`` of the source with its key moved by Gaussian noise as far (in cosine distance) as the median
source key lies from its nearest other source key, so that the replicas are as distinct as real
neighbours; values are copied in ``--value-dtype`` (float16 halves a 576-wide value). Then it indexes the
pack (:func:`dmt.packs.disk.index_pack`).

``measure`` opens the pack in two fresh processes and searches ``--batches`` batches of ``--batch`` queries
(k ``--k``; the keys the same layer made on held-out text, ``HELD_OUT_PACK``) and gathers the values
returned, as a memory layer reading ``--batch`` tokens would:

- **on disk**: values memory-mapped; the pack's files dropped from the page cache first
  (``posix_fadvise(DONTNEED)``), so the first pass reads them from the disk (*cold*), the second again
  (*warm*: what the page cache keeps);
- **in RAM**: the same pack with its values read into memory.

Each reports the seconds to open, queries/s, the resident memory after opening and at the end (``VmRSS``
and its peak ``VmHWM``, anonymous and file-backed) against the pack's bytes, and recall@k against visiting
every list (exact for a flat inverted file) for the held-out queries and for *near* ones (stored keys moved
by the same noise). nprobe is calibrated on other held-out queries than those measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dmt.bench.cli import machine_info
from dmt.bench.real_keys import pack_keys
from dmt.kernel.pack_files import SHARDS, pack_entries, read_pack_json
from dmt.packs.disk import DiskPack, index_pack, layer_documents
from dmt.packs.files import PackDocument, read_pack, write_manifest, write_shard

CALIBRATION = 1024  # held-out queries that calibrate nprobe; the measured ones follow them


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def noise_scale(keys: np.ndarray, rng: np.random.Generator, sample: int = 2048) -> float:
    """Relative noise norm ``r`` moving a key by the median cosine distance ``d`` of a source key to its
    nearest other source key (for an orthogonal move, ``1 - d = 1 / sqrt(1 + r²)``)."""
    rows = unit(keys[rng.choice(len(keys), min(sample, len(keys)), replace=False)])  # (S, D)
    similarity = rows @ unit(keys).T  # (S, B)
    similarity[similarity > 1 - 1e-6] = -np.inf  # the key itself and exact duplicates
    distance = float(np.median(1.0 - similarity.max(axis=1)))
    return float(np.sqrt(1.0 / (1.0 - distance) ** 2 - 1.0))


def moved(keys: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``keys (M, D)`` each moved by noise of norm ``scale · |key|`` in a random direction."""
    noise = unit(rng.standard_normal(keys.shape).astype(np.float32))
    return (keys + scale * np.linalg.norm(keys, axis=1, keepdims=True) * noise).astype(np.float32)


def make(args: argparse.Namespace) -> None:
    source, block = Path(args.keys), str(args.block)
    layer = read_pack(source).layers[block]
    keys, values, tokens = (
        t.numpy()
        for t in pack_entries(source, read_pack_json(source), block, layer["key_dim"], layer["value_dim"])
    )
    rng = np.random.default_rng(0)
    scale = noise_scale(keys, rng)
    target = Path(args.out)
    (target / SHARDS).mkdir(parents=True, exist_ok=False)
    manifest = replace(
        read_pack(source), layers={block: {**layer, "value_dtype": args.value_dtype}}, documents=[]
    )
    per_document = args.entries // args.documents
    started = time.perf_counter()
    for d in range(args.documents):
        ids = np.arange(d * per_document, (d + 1) * per_document) % len(keys)  # (M,) source entries
        shard = f"{d:06d}"
        write_shard(
            target,
            shard,
            {
                block: {
                    "keys": moved(keys[ids], scale, rng),
                    "values": values[ids].astype(args.value_dtype),
                    "offsets": ids,
                    "tokens": tokens[ids],
                }
            },
        )
        digest = hashlib.sha256(f"replica {d}".encode()).hexdigest()
        document = PackDocument(f"replica/{d:04d}", per_document, digest, shard, {block: per_document})
        manifest = replace(manifest, documents=[*manifest.documents, document])
        print(f"\rshard {d + 1}/{args.documents}", end="", flush=True)
    write_manifest(target, manifest)
    written = time.perf_counter() - started
    started = time.perf_counter()
    index_pack(target, block)
    indexed = time.perf_counter() - started
    record = {
        "source": str(source),
        "source_entries": len(keys),
        "noise_scale": scale,
        "write_s": written,
        "index_s": indexed,
    }
    (target / "made.json").write_text(json.dumps(record, indent=1))
    print("\n" + json.dumps(record))


def memory() -> dict[str, int]:
    """This process's resident bytes: VmRSS, its peak VmHWM, and the anonymous and file-backed parts."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(rest.split()[0]) * 1024
    return fields


def pack_files(pack: Path) -> list[Path]:
    return sorted(p for p in pack.rglob("*.npy"))


def drop_cache(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (clean pages; nothing is mapped yet)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_one(args: argparse.Namespace) -> None:
    """One fresh process: open, calibrate, two passes, recall; prints its record as JSON."""
    pack, block, in_ram = Path(args.pack), str(args.block), args.mode == "ram"
    files = pack_files(pack)
    if not in_ram:
        drop_cache(files)
    record: dict[str, Any] = {"mode": args.mode, "start": memory()}
    started = time.perf_counter()
    searched = DiskPack(pack, block, in_ram=in_ram, verify=False, codes=args.codes)
    record["open_s"] = time.perf_counter() - started
    record["opened"] = memory()
    held_out = pack_keys(args.queries)
    needed = CALIBRATION + args.batches * args.batch
    if len(held_out) < needed:
        raise SystemExit(f"{args.queries}: {len(held_out)} queries, {needed} needed")
    started = time.perf_counter()
    searched.search(held_out[:CALIBRATION], args.k)
    record |= {
        "calibrate_s": time.perf_counter() - started,
        "nprobe": searched.nprobe,
        "nlist": searched.nlist,
    }
    record["calibrated_recall"] = searched.calibrated_recall
    if not in_ram:
        drop_cache(files)  # calibration read no values, but keep the first pass honest
    measured = held_out[CALIBRATION:needed]
    for name in ("first_pass", "second_pass"):
        seconds = []
        for b in range(args.batches):
            batch = measured[b * args.batch : (b + 1) * args.batch]
            started = time.perf_counter()
            ids, _ = searched.search(batch, args.k)
            searched.get(ids)  # keys (batch, k, Dk) and values (batch, k, E): what a layer reads
            seconds.append(time.perf_counter() - started)
        record[name] = {"batch_s": seconds, "queries_per_s": args.batch * len(seconds) / sum(seconds)}
        record[name + "_memory"] = memory()
    if args.recall:
        rng = np.random.default_rng(1)
        sample = measured[: args.recall]
        record["recall_held_out"] = searched.recall(sample, args.k)
        stored = np.load(pack / SHARDS / "000000" / f"layer_{int(block):02d}.keys.npy", mmap_mode="r")
        near = moved(np.asarray(stored[rng.choice(len(stored), args.recall, replace=False)]), 0.05, rng)
        record["recall_near"] = searched.recall(near, args.k)
    record["end"] = memory()
    print(json.dumps(record))


def measure(args: argparse.Namespace) -> None:
    pack = Path(args.pack)
    pack_bytes = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    entries = sum(count for _, _, count in layer_documents(pack, read_pack_json(pack), str(args.block)))
    rows = []
    for mode in ("disk", "ram"):
        command = [sys.executable, "-m", "benchmarks.disk_pack", "measure-one", str(pack), "--mode", mode]
        command += [
            "--queries",
            args.queries,
            "--block",
            str(args.block),
            "--k",
            str(args.k),
            "--codes",
            args.codes,
        ]
        command += [
            "--batch",
            str(args.batch),
            "--batches",
            str(args.batches),
            "--recall",
            str(args.recall if mode == "disk" else 0),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    disk, ram = rows
    summary = {
        "codes": args.codes,
        "entries": entries,
        "pack_bytes": pack_bytes,
        "disk_resident_peak_vs_pack": disk["end"]["VmHWM"] / pack_bytes,
        "disk_resident_end_vs_pack": disk["end"]["VmRSS"] / pack_bytes,
        "cold_vs_ram_queries_per_s": disk["first_pass"]["queries_per_s"]
        / ram["second_pass"]["queries_per_s"],
        "warm_vs_ram_queries_per_s": disk["second_pass"]["queries_per_s"]
        / ram["second_pass"]["queries_per_s"],
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        made = pack / "made.json"
        payload = {
            "command": "python -m benchmarks.disk_pack " + " ".join(sys.argv[1:]),
            "machine": machine_info(),
            "made": json.loads(made.read_text()) if made.is_file() else None,
            "summary": summary,
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("make")
    making.add_argument("out")
    making.add_argument("--keys", required=True)
    making.add_argument("--block", type=int, default=29)
    making.add_argument("--entries", type=int, default=10_000_000)
    making.add_argument("--documents", type=int, default=100)
    making.add_argument("--value-dtype", default="float16")
    for name in ("measure", "measure-one"):
        measuring = commands.add_parser(name)
        measuring.add_argument("pack")
        measuring.add_argument("--queries", required=True)
        measuring.add_argument("--block", type=int, default=29)
        measuring.add_argument("--k", type=int, default=32)
        measuring.add_argument("--batch", type=int, default=1024)
        measuring.add_argument("--batches", type=int, default=4)
        measuring.add_argument("--recall", type=int, default=512)
        measuring.add_argument("--codes", default="float16", help="how faiss holds the keys it ranks")
    commands.choices["measure"].add_argument("--out")
    commands.choices["measure-one"].add_argument("--mode", choices=("disk", "ram"), required=True)
    args = parser.parse_args()
    {"make": make, "measure": measure, "measure-one": measure_one}[args.command](args)


if __name__ == "__main__":
    main()
