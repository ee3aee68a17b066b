"""faiss index variants on the real keys of a memory pack: recall@k of held-out queries against exact
search, and the time to search 1,024 of them beside the GPT-2 MLP's forward on 1,024 tokens (medians of 5
after one warm-up), read-only (no inserts). Keys are normalised (the packs' cosine metric).

python -m benchmarks.faiss_variants KEYS_PACK HELD_OUT_PACK [--size 1048576] [--nlists 1024 4096]

Prints one JSON line per variant and setting: IVF-Flat at several nprobe, IVF-PQ (4-bit fast scan, 32
sub-quantisers) re-ranked exactly (IndexRefineFlat, k_factor), and HNSW-Flat at several efSearch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss
import numpy as np

from dmt.bench.real_keys import mlp_forward, pack_keys

K = 32
QUERIES = 1024


def normalised(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def median_seconds(step, repeats: int = 5) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keys_pack")
    parser.add_argument("held_out_pack")
    parser.add_argument("--size", type=int, default=1_048_576)
    parser.add_argument("--nlists", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    keys = normalised(pack_keys(args.keys_pack, args.size))  # (N, D)
    held = pack_keys(args.held_out_pack)
    pick = np.random.default_rng(0).permutation(len(held))
    queries = normalised(held[np.sort(pick[QUERIES : 2 * QUERIES])])  # as dmt.bench's measured queries
    exact = faiss.IndexFlatIP(keys.shape[1])
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
        sample = keys[rng.choice(len(keys), min(len(keys), 64 * nlist), replace=False)]
        started = time.perf_counter()
        ivf = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(keys.shape[1]), keys.shape[1], nlist, faiss.METRIC_INNER_PRODUCT
        )
        ivf.train(sample)
        ivf.add(keys)
        report(f"IVF{nlist},Flat", ivf, (8, 16, 32, 64), nprobe, time.perf_counter() - started)
        started = time.perf_counter()
        pq = faiss.IndexRefineFlat(
            faiss.index_factory(keys.shape[1], f"IVF{nlist},PQ32x4fs", faiss.METRIC_L2)
        )
        pq.train(sample)
        pq.add(keys)
        report(
            f"IVF{nlist},PQ32x4fs,RFlat",
            pq,
            ((16, 4), (32, 4), (32, 8), (64, 4)),
            refined,
            time.perf_counter() - started,
        )
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(keys.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(keys)
    report("HNSW32,Flat", hnsw, (32, 64, 128), ef, time.perf_counter() - started)


if __name__ == "__main__":
    main()
