"""Smoke test of the benchmark harness: ``--quick`` in-process, checking the report's sections."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from dmt.bench.cli import main, table
from dmt.layers.arithmetic import MultiplyAdds


def numbers(tree: Any) -> Iterator[float]:
    """Every int/float leaf of a JSON tree (bools are flags, not measurements)."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield float(tree)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    assert main(["--quick", "--out", str(out), "--cache-dir", str(tmp / "cache")]) == 0
    return json.loads(out.read_text())


def test_every_section_present_and_finite(report):
    for section in ("machine", "settings", "targets", "layers", "distillation", "footprint"):
        assert section in report
    assert {(r["layer"], r["size"]) for r in report["layers"]} == {
        ("featural", 4096),
        ("associative", 4096),
        ("featural_product", 4096),
        ("featural_faiss", 4096),
        ("associative_faiss", 4096),
    }
    assert all(math.isfinite(x) for x in numbers(report))


def test_measurements_positive(report):
    for r in report["layers"]:
        measured = [r["median_s"], r["mlp_median_s"], r["profile"]["total_s"], *r["index"].values()]
        measured += [v for k, v in r["store_build"].items() if k.endswith("_s")]
        if r["layer"] == "featural_product":  # fixed keys: no inserts, so no insert rates
            assert r["index"]["churn_inserts_per_s"] is None
            measured = [x for x in measured if x is not None]
        assert all(x > 0 for x in measured)
        assert 0 < r["index"]["recall_near"] <= 1 and 0 < r["index"]["recall_random"] <= 1
        assert all(x >= 0 for x in r["profile"]["fractions"].values())
        assert r["profile"]["fractions"]["search"] > 0 and r["profile"]["fractions"]["backward"] > 0
    d = report["distillation"]
    assert d["dense"]["tokens_per_s"] > 0 and d["memory"]["tokens_per_s"] > 0
    f = report["footprint"]
    for dtype in ("float32", "float16"):
        # RSS growth may be 0 at smoke sizes (the allocator reuses freed pages); disk size may not.
        assert f[dtype]["disk_bytes"] > 0 and f[dtype]["load"]["peak_delta_bytes"] >= 0
    assert f["float16"]["disk_bytes"] < f["float32"]["disk_bytes"]
    assert report["process_peak_rss_bytes"] > 0


def test_ratios_come_from_measured_times(report):
    tokens = report["settings"]["batch"] * report["settings"]["seq"]
    for r in report["layers"]:
        assert r["ratio_vs_mlp"] == pytest.approx(r["median_s"] / r["mlp_median_s"], rel=1e-12)
        assert r["per_token_us"] == pytest.approx(r["median_s"] / tokens * 1e6, rel=1e-12)
    d = report["distillation"]
    assert d["ratio_vs_dense"] == pytest.approx(d["memory"]["tokens_per_s"] / d["dense"]["tokens_per_s"])
    assert d["dense"]["tokens_per_s"] == pytest.approx(tokens / d["dense"]["median_s"])


def test_multiply_adds_beside_the_mlps(report):
    mlp = 2 * 768 * 3072  # GPT-2's MLP, 768 → 3072 → 768
    lines = table(report).splitlines()
    for r in report["layers"]:
        counts = MultiplyAdds(**{k: v for k, v in r["multiply_adds"].items() if k != "total"})
        assert counts.total == r["multiply_adds"]["total"] > 0 and r["mlp_multiply_adds"] == mlp
        assert r["multiply_adds_vs_mlp"] == pytest.approx(counts.total / mlp, rel=1e-12)
        settings = r["settings"]
        per_head = settings["topk"] * (settings["key_dim"] + settings["value_dim"])  # distances, values
        assert counts.read == settings["heads"] * per_head
        row = next(line for line in lines if line.startswith(r["layer"] + " "))
        assert f"{counts.total / 1e6:.2f}" in row and f"{r['multiply_adds_vs_mlp']:.2f}" in row
    product = next(r for r in report["layers"] if r["layer"] == "featural_product")
    # 4096 = 64² product keys: two tables of 64 sub-keys of key_dim / 2
    assert product["multiply_adds"]["search"] == 64 * product["settings"]["key_dim"]


def test_exact_block_sizes_are_compared_side_by_side(report):
    assert len(report["exact_blocks"]) == 2
    for e in report["exact_blocks"]:
        assert set(e["seconds"]) == {"2^20", "2^22", "2^24", "2^26"} and e["default"] == "2^22"
        assert all(seconds > 0 for seconds in e["seconds"].values())
        assert e["fastest"] in e["seconds"]
    assert "distances per block" in table(report)
