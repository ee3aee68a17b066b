"""The GPU checks as one prepared run, for a session lent a GPU machine (the ``device`` tool).

Prepare here: the packs are too large to travel, so a float16 sample of their keys does, with the wheels
of what the machine's image lacks (pinned to the versions installed here; ``chroma-hnswlib`` stands in for
``hnswlib``, which has no cp312 wheel), into the git-ignored ``.device/``:

    python -m benchmarks.device_check prepare --keys /work/mem/plays.pack --held-out /work/mem/heldout.pack

Then run there, as one command that carries ``.device`` (``run``'s ``carry``), with a timeout that leaves
time to run it again:

    python3 -m benchmarks.device_check run --out $OUT

``run`` installs the carried wheels into ``/tmp/site``, then runs, each logged to ``OUT``: the CUDA tests,
and the real-key benchmark (:mod:`dmt.bench.real_keys`) with the memory layers, their stores and the GPT-2
MLP on the GPU, the exact-search rows searching there and the faiss rows on the host, on the sample's real
keys and on Gaussian keys of the same shape. The bf16-mixed training check was run on a lent H200 on
2026-12-04 (docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

DEVICE_DIR = Path(".device")
# Stored keys a sample holds: what travels beside the wheels within the 64 MiB a device call carries.
SAMPLE_KEYS = 131_072
# Inserts the benchmark's churn takes beyond the stored keys: (warm-up + repeats) x its churn step.
CHURN_KEYS = 7 * 4096
# The packages the machine's image lacks, as installed here; "hnswlib" comes as chroma-hnswlib's wheel.
MISSING = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "faiss-cpu", "hnswlib", "dill", "gguf")
STAND_INS = {"hnswlib": ("chroma-hnswlib", "0.7.6")}
# The image's Python, which the wheels are chosen for.
PYTHON_VERSION = "3.12"
CARRY_LIMIT = 64 * 2**20
# The CUDA tests (the benchmark's own needs scann, which does not travel, for its other tests).
CUDA_TESTS = (
    "tests/layers/test_layer_device.py",
    "tests/memory/test_memory_device.py",
    "tests/bench/test_real_keys.py::test_layer_rows_run_on_a_cuda_device_searching_there",
)
# The benchmark's layer rows: on exact search (on the GPU) and on faiss (on the host).
BENCH_ROWS = (
    "featural_exact",
    "associative_exact",
    "read_only_exact",
    "featural",
    "associative",
    "read_only",
)


def wheel_pins() -> list[str]:
    """``name==version`` of each :data:`MISSING` package as installed here (its stand-in's, if any)."""
    pins = []
    for name in MISSING:
        package, pinned = STAND_INS.get(name, (name, version(name)))
        pins.append(f"{package}=={pinned}")
    return pins


def prepare(keys: Path, held_out: Path, to: Path, count: int, wheels: bool) -> int:
    """Write ``to/keys.npy`` (the first ``count`` + :data:`CHURN_KEYS` keys of the pack ``keys``),
    ``to/held_out.npy`` (every key of ``held_out``), both float16, and, with ``wheels``, the wheels into
    ``to/wheels``; print what will travel against the carry limit."""
    import numpy as np

    from dmt.bench.real_keys import pack_keys  # imported here: `run` works before dmt's needs are installed

    to.mkdir(parents=True, exist_ok=True)
    np.save(to / "keys.npy", pack_keys(keys, count + CHURN_KEYS).astype(np.float16))
    np.save(to / "held_out.npy", pack_keys(held_out).astype(np.float16))
    if wheels:
        platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)]
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(to / "wheels")]
        binary = [*pip, "--only-binary=:all:", f"--python-version={PYTHON_VERSION}", *platforms]
        built, source = [], []  # antlr4-python3-runtime is a source archive only: pure Python, built there
        for pin in wheel_pins():
            (source if pin.startswith("antlr4") else built).append(pin)
        subprocess.run([*binary, *built], check=True)
        subprocess.run([*pip, *source], check=True)
    total = sum(path.stat().st_size for path in to.rglob("*") if path.is_file())
    print(f"{to}: {total / 2**20:.1f} MiB to carry (a device call carries {CARRY_LIMIT >> 20} MiB in all)")
    return 0


def commands(out: Path, device: str, size: int, quick: bool) -> list[tuple[str, list[str]]]:
    """The checks ``run`` makes, in order: ``(log name, argv)``."""
    bench = [
        "-m", "dmt.bench", "--device", device, "--keys", str(DEVICE_DIR / "keys.npy"),
        "--held-out", str(DEVICE_DIR / "held_out.npy"), "--sizes", str(size), "--backends", "exact", "faiss",
        "--key-layers", *BENCH_ROWS, "--out", str(out / "real_keys_device.json"), "--force",
    ]  # fmt: skip
    checks = [("real_keys_device", [sys.executable, *bench, *(["--quick"] if quick else [])])]
    if device.startswith("cuda"):
        checks.insert(
            0, ("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS])
        )
    return checks


def run(out: Path, device: str, size: int, quick: bool) -> int:
    """Install the carried wheels (if any), then each of :func:`commands`, its output shown as it comes
    and kept in ``out/<name>.log``; the exit status is the first failure's, 0 if none failed."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    wheels = sorted((DEVICE_DIR / "wheels").glob("*"))
    if wheels:
        site = "/tmp/site"
        # No index there; the antlr4 source archive is built with the image's own setuptools.
        pip = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
        ]
        subprocess.run([*pip, "--target", site, *map(str, wheels)], check=True)
        env["PYTHONPATH"] = os.pathsep.join([site, os.getcwd(), env.get("PYTHONPATH", "")])
    status = 0
    for name, argv in commands(out, device, size, quick):
        print(f"{name}: {' '.join(argv)}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
            for line in process.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                log.write(line)
            code = process.wait()
        print(
            f"{name}: {'passed' if code == 0 else f'failed ({code})'}, log {out / f'{name}.log'}", flush=True
        )
        status = status or code
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steps = parser.add_subparsers(dest="step", required=True)
    ready = steps.add_parser("prepare", help="here: the key sample and the wheels into .device/")
    ready.add_argument("--keys", type=Path, required=True, help="the pack whose keys fill the stores")
    ready.add_argument("--held-out", type=Path, required=True, help="the pack of held-out text: the queries")
    ready.add_argument("--count", type=int, default=SAMPLE_KEYS, help=f"stored keys (default {SAMPLE_KEYS})")
    ready.add_argument("--no-wheels", action="store_true", help="only the keys")
    there = steps.add_parser("run", help="there: install the wheels, run the checks")
    there.add_argument("--out", type=Path, required=True, help="where the logs and the report go")
    there.add_argument("--device", default="cuda", help="where the layers run (default cuda)")
    there.add_argument("--size", type=int, default=SAMPLE_KEYS, help=f"stored keys (default {SAMPLE_KEYS})")
    there.add_argument("--quick", action="store_true", help="the benchmark's smoke settings")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        return prepare(args.keys, args.held_out, DEVICE_DIR, args.count, not args.no_wheels)
    return run(args.out, args.device, args.size, args.quick)


if __name__ == "__main__":
    sys.exit(main())
