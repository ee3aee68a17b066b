"""faiss index variants on the real keys of a memory pack: recall@k of held-out queries against exact
search, and the time to search 1,024 of them beside the GPT-2 MLP's forward on 1,024 tokens (medians of 5
after one warm-up), read-only (no inserts). Keys are normalised (the packs' cosine metric).

python -m benchmarks.faiss_variants KEYS_PACK HELD_OUT_PACK [--size 1048576] [--nlists 4096 16384]
    [--kinds flat sq8 sq8r pq32r pq64r hnsw]

Prints one JSON line per variant and setting: IVF-Flat and IVF with 8-bit scalar-quantised codes (sq8) at
several nprobe; IVF with 8-bit scalar or 4-bit fast-scan product-quantised codes (32 or 64
sub-quantisers), each re-ranked exactly on the float keys (``IndexRefineFlat``: ``k_factor · k``
candidates), at several (nprobe, k_factor); HNSW-Flat at several efSearch. The inverted files of one
nlist share one k-means (its time printed once; build_s is the rest: training the codes, adding the keys).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import faiss
import numpy as np

from dmt.bench.real_keys import mlp_forward, pack_keys

K = 32
QUERIES = 1024
# Training keys per inverted list (faiss warns below 39; 40 keeps the k-means of 16,384 lists short).
SAMPLE_PER_LIST = 40
# (nprobe, k_factor) settings of the re-ranked variants.
REFINED = ((32, 8), (48, 8), (48, 16), (64, 16), (64, 32), (96, 16), (96, 32))
# Codes of the inverted files searched at several nprobe, and of the re-ranked ones, by --kinds name.
PLAIN = {"flat": "Flat", "sq8": "SQ8"}
REFINED_CODES = {"sq8r": "SQ8", "pq32r": "PQ32x4fs", "pq64r": "PQ64x4fs"}
NPROBES = (16, 32, 48, 64, 96, 128)


def normalised(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def median_seconds(step: Callable[[], object], repeats: int = 5) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def inverted_file(quantizer: faiss.Index, nlist: int, code: str) -> faiss.IndexIVF:
    """An inner-product inverted file of ``code`` (Flat, SQ8, PQ<M>x4fs) over the trained ``quantizer``'s
    ``nlist`` centroids; its codes still to train."""
    dim, metric = quantizer.d, faiss.METRIC_INNER_PRODUCT
    if code == "Flat":
        return faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
    if code == "SQ8":
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric)
    subquantisers = int(code[2:].split("x")[0])
    return faiss.IndexIVFPQFastScan(quantizer, dim, nlist, subquantisers, 4, metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keys_pack")
    parser.add_argument("held_out_pack")
    parser.add_argument("--size", type=int, default=1_048_576)
    parser.add_argument("--nlists", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=[*PLAIN, *REFINED_CODES, "hnsw"],
        default=[*PLAIN, *REFINED_CODES],
    )
    args = parser.parse_args()
    keys = normalised(pack_keys(args.keys_pack, args.size))  # (N, D)
    dim = keys.shape[1]
    held = pack_keys(args.held_out_pack)
    pick = np.random.default_rng(0).permutation(len(held))
    queries = normalised(held[np.sort(pick[QUERIES : 2 * QUERIES])])  # as dmt.bench's measured queries
    exact = faiss.IndexFlatIP(dim)
    exact.add(keys)
    truth = exact.search(queries, K)[1]
    mlp = median_seconds(mlp_forward(QUERIES))
    print(json.dumps({"size": len(keys), "mlp_forward_s": mlp}), flush=True)
    rng = np.random.default_rng(1)

    def report(name: str, index, settings, setting, build_s: float) -> None:
        for value in settings:
            setting(index, value)
            found = index.search(queries, K)[1]
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, found, strict=True)]))
            seconds = median_seconds(lambda: index.search(queries, K))
            row = {"index": name, "setting": value, "build_s": round(build_s, 1), "recall": round(recall, 4)}
            print(json.dumps({**row, "search_s": seconds, "search_vs_mlp": seconds / mlp}), flush=True)

    def nprobe(index, value) -> None:
        index.nprobe = value

    def refined(index, value) -> None:
        faiss.extract_index_ivf(index.base_index).nprobe, index.k_factor = value

    def ef(index, value) -> None:
        index.hnsw.efSearch = value

    for nlist in args.nlists:
        # One k-means per nlist: every inverted file of that nlist files the keys under the same centroids.
        sample = keys[rng.choice(len(keys), min(len(keys), SAMPLE_PER_LIST * nlist), replace=False)]
        started = time.perf_counter()
        flat = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        flat.train(sample)
        quantizer, kmeans_s = flat.quantizer, time.perf_counter() - started
        print(json.dumps({"nlist": nlist, "kmeans_s": kmeans_s}), flush=True)

        for kind in (kind for kind in args.kinds if kind in PLAIN):
            started = time.perf_counter()
            index = inverted_file(quantizer, nlist, PLAIN[kind])
            index.train(sample)
            index.add(keys)
            report(f"IVF{nlist},{PLAIN[kind]}", index, NPROBES, nprobe, time.perf_counter() - started)
        for kind in (kind for kind in args.kinds if kind in REFINED_CODES):
            started = time.perf_counter()
            index = faiss.IndexRefineFlat(inverted_file(quantizer, nlist, REFINED_CODES[kind]))
            index.train(sample)
            index.add(keys)
            name = f"IVF{nlist},{REFINED_CODES[kind]},RFlat"
            report(name, index, REFINED, refined, time.perf_counter() - started)
    if "hnsw" in args.kinds:
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 64
        hnsw.add(keys)
        report("HNSW32,Flat", hnsw, (32, 64, 128), ef, time.perf_counter() - started)


if __name__ == "__main__":
    main()
