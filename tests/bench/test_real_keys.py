"""The real-key benchmark: keys read from packs in document order, both key sets measured per backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_key_pack

from dmt.bench.cli import main
from dmt.bench.real_keys import key_sets, load_keys, pack_keys
from dmt.errors import InputFileError
from dmt.memory import trained
from dmt.packs import PackError

DIM = 16


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    tmp = tmp_path_factory.mktemp("packs")
    keys = write_key_pack(tmp / "stored", [1500, 2500, 1200], seed=0)
    write_key_pack(tmp / "held_out", [300], seed=0)  # the same centres: text of the same kind
    return tmp / "stored", tmp / "held_out", keys


def test_keys_come_in_document_order_and_too_few_are_named(packs):
    stored, held_out, keys = packs
    np.testing.assert_array_equal(pack_keys(stored, 2000), keys[:2000])
    np.testing.assert_array_equal(pack_keys(stored), keys)
    with pytest.raises(PackError, match="5200 keys in layer 3, fewer than the 6000 asked for"):
        pack_keys(stored, 6000)
    sets = key_sets(stored, held_out, 4000, 500, 100, stream=250)
    assert {name: sets["real"][name].shape for name in sets["real"]} == {
        "keys": (4000, DIM),
        "churn": (500, DIM),
        "calibration": (100, DIM),
        "queries": (100, DIM),
        "stream": (250, DIM),
    }
    np.testing.assert_array_equal(sets["real"]["stream"], pack_keys(held_out)[:250])  # document order
    assert {name: a.shape for name, a in sets["gaussian"].items()} == {
        n: a.shape for n, a in sets["real"].items()
    }
    calibration, queries = ({tuple(row) for row in sets["real"][n]} for n in ("calibration", "queries"))
    assert not calibration & queries  # faiss never calibrates on the queries it is measured on
    with pytest.raises(PackError, match="300 held-out keys, fewer than 2 x 100 queries or a stream of 400"):
        key_sets(stored, held_out, 4000, 500, 100, stream=400)


def test_every_backend_is_measured_on_both_key_sets(packs, tmp_path, monkeypatch):
    monkeypatch.setattr(trained, "TRAIN_MIN", 1024)  # faiss trains its lists in a 4096-entry store
    stored, held_out, _ = packs
    out = tmp_path / "bench.json"
    argv = ["--quick", "--keys", str(stored), "--held-out", str(held_out), "--churn", "64", "--out", str(out)]
    assert main([*argv, "--backends", "exact", "faiss", "--key-layers"]) == 0
    rows = json.loads(out.read_text())["real_keys"][0]["rows"]
    assert [(r["keys"], r["backend"], r["size"]) for r in rows] == [
        (keys, backend, 4096) for keys in ("real", "gaussian") for backend in ("exact", "faiss")
    ]
    for r in rows:
        assert r["read_s"] > 0 and r["churn_s"] > 0 and r["mlp_forward_s"] > 0
        assert 0 < r["recall_held_out"] <= 1 and 0 < r["recall_near"] <= 1
        assert r["recall_held_out"] == 1.0 if r["backend"] == "exact" else r["index_state"]["trained"]
    real_faiss = rows[1]
    assert real_faiss["recall_held_out"] >= 0.9 and real_faiss["index_state"]["nprobe"] >= 1


def test_every_layer_is_timed_on_both_key_sets_searching_with_the_held_out_keys(
    packs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(trained, "TRAIN_MIN", 1024)
    stored, held_out, _ = packs
    out = tmp_path / "bench.json"
    argv = ["--quick", "--keys", str(stored), "--held-out", str(held_out), "--churn", "64", "--out", str(out)]
    assert main([*argv, "--backends", "faiss"]) == 0
    section = json.loads(out.read_text())["real_keys"][0]
    rows = section["layer_rows"]
    assert [(r["keys"], r["layer"]) for r in rows] == [
        (keys, layer)
        for keys in ("real", "gaussian")
        for layer in (
            "featural",
            "associative",
            "read_only",
            "read_only_scann",
            "featural_scann",
            "associative_scann",
        )
    ]
    for r in rows:
        backend = "scann" if r["layer"].endswith("_scann") else "faiss"
        assert r["settings"]["key_dim"] == DIM and r["settings"]["index"]["backend"] == backend
        assert r["median_s"] > 0 and r["mlp_median_s"] > 0
        assert r["ratio_vs_mlp"] == pytest.approx(r["median_s"] / r["mlp_median_s"])
        assert 0 < r["recall_held_out"] <= 1 and r["index_state"]["trained"]
    by_name = {(r["keys"], r["layer"]): r for r in rows}
    for layer in ("read_only", "read_only_scann"):  # a memorised pack: nothing inserted
        assert by_name["real", layer]["inserts_per_step"] == 0
    # Gaussian queries lie far from the stored keys: each training layer inserts, and the full store evicts
    # as many as it inserts.
    for layer in ("featural", "associative", "featural_scann", "associative_scann"):
        row = by_name["gaussian", layer]
        assert 0 < row["inserts_per_step"] <= 32  # --quick: 1 x 32 tokens a step
        assert row["evictions_per_step"] == row["inserts_per_step"]
    assert "read_only" in capsys.readouterr().out


def test_layers_search_with_the_keys_they_are_fed():
    from dmt.bench.real_keys import aim_at_keys, key_inputs
    from dmt.bench.stores import layer_config
    from dmt.layers import build_memory_layer

    cfg = layer_config("associative_faiss", 64, 768, (f"swap.read.key_dim={DIM}", "swap.read.heads=2"))
    layer = build_memory_layer(768, cfg, None)
    aim_at_keys(layer, DIM)
    stream = np.random.default_rng(0).standard_normal((12, DIM)).astype(np.float32)
    ((hidden, _),) = key_inputs(stream, 1, 3, 4, grad=False)
    for projection in (layer.query_proj, layer.key_proj):
        heads = projection(hidden).reshape(12, 2, DIM)  # (B·T, H, Dk): every head gets the token's key
        torch.testing.assert_close(heads, torch.from_numpy(stream)[:, None].expand(12, 2, DIM))


def test_one_key_set_alone(packs, tmp_path, monkeypatch):
    monkeypatch.setattr(trained, "TRAIN_MIN", 1024)
    stored, held_out, _ = packs
    out = tmp_path / "bench.json"
    argv = ["--quick", "--keys", str(stored), "--held-out", str(held_out), "--churn", "64", "--out", str(out)]
    assert main([*argv, "--backends", "exact", "--key-sets", "real", "--key-layers", "read_only"]) == 0
    section = json.loads(out.read_text())["real_keys"][0]
    assert [(r["keys"], r["backend"]) for r in section["rows"]] == [("real", "exact")]
    assert [(r["keys"], r["layer"]) for r in section["layer_rows"]] == [("real", "read_only")]


def test_keys_without_queries_is_a_usage_error(packs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--keys", str(packs[0])])
    assert exit_info.value.code == 2
    assert "--keys and --held-out go together" in capsys.readouterr().err


def test_keys_come_from_a_npy_file_as_from_the_pack_they_were_taken_from(packs, tmp_path):
    stored, _, keys = packs
    np.save(tmp_path / "keys.npy", keys.astype(np.float16))
    sample = load_keys(tmp_path / "keys.npy", 2000)
    assert sample.dtype == np.float32
    np.testing.assert_array_equal(sample, load_keys(stored, 2000).astype(np.float16).astype(np.float32))
    with pytest.raises(InputFileError, match="5200 keys, fewer than the 6000 asked for"):
        load_keys(tmp_path / "keys.npy", 6000)
    np.save(tmp_path / "flat.npy", keys[:, 0])
    with pytest.raises(
        InputFileError, match=r"flat.npy: keys must be a 2-D float array, got float32 \(5200,\)"
    ):
        load_keys(tmp_path / "flat.npy")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(InputFileError, match="broken.npy: not a readable .npy key file"):
        load_keys(tmp_path / "broken.npy")


@pytest.mark.parametrize(
    ("device", "with_keys", "message"),
    [
        ("tpu", True, "--device: not a torch device: 'tpu'"),
        ("meta", True, "--device: cpu or cuda[:N], got 'meta'"),
        ("cuda", False, "--device applies to the real-key layer rows (--keys)"),
    ],
)
def test_a_device_the_bench_cannot_use_is_named(packs, tmp_path, capsys, device, with_keys, message):
    stored, held_out, _ = packs
    keys = ["--keys", str(stored), "--held-out", str(held_out)] if with_keys else []
    with pytest.raises(SystemExit) as stop:
        main(["--quick", "--device", device, *keys, "--out", str(tmp_path / "bench.json")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_where_torch_sees_none(packs, tmp_path, capsys):
    stored, held_out, _ = packs
    argv = ["--quick", "--device", "cuda", "--keys", str(stored), "--held-out", str(held_out)]
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "bench.json")])
    assert "--device cuda: this torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_rows_run_on_a_cuda_device_searching_there(packs, tmp_path):
    stored, held_out, _ = packs
    out = tmp_path / "bench.json"
    argv = [
        "--quick",
        "--device",
        "cuda",
        "--keys",
        str(stored),
        "--held-out",
        str(held_out),
        "--churn",
        "64",
    ]
    layers = ["--key-layers", "featural_exact", "read_only_exact", "read_only"]
    assert main([*argv, "--backends", "exact", "--key-sets", "real", *layers, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["real_keys"][0]["layer_rows"]
    assert [(r["layer"], r["device"]) for r in rows] == [(layer, "cuda") for layer in layers[1:]]
    assert all(r["recall_held_out"] == 1.0 for r in rows if r["layer"].endswith("_exact"))
