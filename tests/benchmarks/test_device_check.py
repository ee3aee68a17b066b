"""The prepared GPU run: a key sample that travels, and the checks it runs (here on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import numpy as np
from conftest import REPO, write_key_pack

from benchmarks import device_check
from dmt.bench.real_keys import EXACT_ROWS, pack_keys


def test_prepared_keys_travel_as_float16_and_the_run_measures_every_layer_row_on_them(
    tmp_path, monkeypatch, capsys
):
    stored = tmp_path / "stored"
    write_key_pack(stored, [20000, 13000], seed=0)
    write_key_pack(tmp_path / "held_out", [300], seed=0)
    monkeypatch.chdir(tmp_path)
    argv = ["prepare", "--keys", str(stored), "--held-out", str(tmp_path / "held_out"), "--count", "4096"]
    assert device_check.main([*argv, "--no-wheels"]) == 0
    keys = np.load(tmp_path / ".device" / "keys.npy")
    assert keys.dtype == np.float16 and keys.shape == (4096 + device_check.CHURN_KEYS, 16)
    np.testing.assert_array_equal(keys, pack_keys(stored, len(keys)).astype(np.float16))
    assert "MiB to carry" in capsys.readouterr().out

    assert device_check.main(["run", "--out", "out", "--device", "cpu", "--size", "4096", "--quick"]) == 0
    report = json.loads((tmp_path / "out" / "real_keys_device.json").read_text())
    rows = report["real_keys"][0]["layer_rows"]
    assert [(r["keys"], r["layer"], r["device"]) for r in rows] == [
        (keys, layer, "cpu") for keys in ("real", "gaussian") for layer in device_check.BENCH_ROWS
    ]
    assert all(r["recall_held_out"] == 1.0 for r in rows if r["layer"] in EXACT_ROWS)
    assert "real_keys_device: passed" in capsys.readouterr().out


def test_the_gpu_run_starts_with_the_cuda_tests_that_exist_and_pins_the_wheels_installed_here(tmp_path):
    (first, tests), (second, bench) = device_check.commands(tmp_path, "cuda", 131072, quick=False)
    assert (first, second) == ("cuda_tests", "real_keys_device")
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *device_check.CUDA_TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr  # every test named exists
    assert tests[-len(device_check.CUDA_TESTS) :] == list(device_check.CUDA_TESTS)
    assert bench[bench.index("--device") + 1] == "cuda" and bench[bench.index("--sizes") + 1] == "131072"
    pins = device_check.wheel_pins()
    assert "chroma-hnswlib==0.7.6" in pins and f"faiss-cpu=={version('faiss-cpu')}" in pins
    assert f"hydra-core=={version('hydra-core')}" in pins
