"""``dmt.bench.search_breadth`` on a tiny random teacher: recall and search time per breadth."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from dmt.bench.search_breadth import exact_copy, main, parse_args, table
from dmt.bench.throughput import compose_experiment
from dmt.memory import KNNStore


def tiny_overrides(text_dir) -> list[str]:
    """A tiny Llama teacher on a few trimmed plays, short blocks, the upper 2 blocks swapped."""
    return [
        "teacher=tiny_llama",
        "swap.read.value_dim=16",
        "swap.blocks=-2:",
        f"data.paths=['{text_dir}']",
        "data.block_size=16",
        "data.batch_size=2",
        "data.max_val_blocks=2",
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory, text_dir) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("breadth") / "breadth.json"
    argv = [
        "--experiment",
        "associative_upper",
        "--steps",
        "3",
        "--sample-steps",
        "2",
        "--ef",
        "1",
        "8",
        "derived",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--repeats", "1", "--out", str(out), *tiny_overrides(text_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_every_hnsw_layer_reports_each_breadth_and_exact(report):
    assert sorted(report["layers"]) == ["2", "3"]
    for layer in report["layers"].values():
        assert 0 < layer["entries"] <= layer["capacity"]
        # 2 sample steps x (2 x 16 queries x 4 heads), strided down to 64 each
        assert layer["queries"] == 2 * 64
        breadths = layer["breadths"]
        assert list(breadths) == ["1", "8", "derived", "exact"]
        assert breadths["1"]["ef"] == layer["k"]  # raised to k
        assert breadths["exact"]["recall_at_k"] == 1.0
        for row in breadths.values():
            assert 0.0 <= row["recall_at_k"] <= 1.0 and row["us_per_query"] > 0
    assert report["summary"]["derived"]["min_recall"] <= report["summary"]["derived"]["median_recall"]
    cfg = compose_experiment("associative_upper", [])
    assert report["shipped_ef_search"] == cfg.swap.index.ef_search
    assert "derived" in table(report)


def test_exact_copy_answers_as_exact_search_of_the_store():
    rng = np.random.default_rng(0)
    store = KNNStore(8, 2, 64, metric="cosine", index={"backend": "hnsw"})
    store.insert(
        rng.standard_normal((40, 8), dtype=np.float32), rng.standard_normal((40, 2), dtype=np.float32)
    )
    queries = rng.standard_normal((5, 8), dtype=np.float32)
    ids, _ = exact_copy(store).search(queries, 4)
    assert store.recall(queries, 4) == pytest.approx(1.0)  # small graph: hnsw is exact here
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(store.search(queries, 4)[0], 1))


def test_set_search_breadth_is_an_hnsw_setting():
    store = KNNStore(4, 2, 16, index={"backend": "exact"})
    with pytest.raises(ValueError, match="ef_search is an hnsw setting"):
        store.set_search_breadth(8)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "2", "--sample-steps", "3"])
    with pytest.raises(SystemExit):
        parse_args(["--ef", "0"])
