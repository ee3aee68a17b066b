"""``python -m dmt.bench.footprint [overrides]``: export bytes and resident memory, student beside teacher.

Builds the student that the composed config describes (``experiment=quality_all_memory``: every MLP of
the teacher a featural memory holding its rows) from the teacher, without training (sizes do not depend on
it), writes its export and the teacher's own fp32 ``save_pretrained``, and loads each in a fresh process,
measuring the resident set size after the imports, after loading and after one forward:

- ``teacher``: ``AutoModelForCausalLM.from_pretrained`` of the fp32 teacher;
- ``student_dmt_mmap`` / ``student_dmt``: ``dmt.model.persistence.load_pretrained`` with and without
  memory-mapped stores;
- ``student_transformers``: ``AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)``.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dmt.bench.stores import PeakRSS, directory_bytes

FORWARD_TOKENS = 128
LOADERS = ("teacher", "student_dmt_mmap", "student_dmt", "student_transformers")


def measure(loader: str, directory: Path) -> dict[str, int]:
    """Load ``directory`` with ``loader`` in this (fresh) process; resident bytes at each stage (and the
    peak while loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dmt.model.persistence import load_pretrained

    with PeakRSS() as load:
        if loader == "teacher":
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        elif loader == "student_transformers":
            model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
        else:
            model, _ = load_pretrained(directory, mmap=loader == "student_dmt_mmap")
    with torch.no_grad():
        model.eval()(torch.arange(FORWARD_TOKENS)[None] % model.config.vocab_size)
    return {
        "after_imports": load.start,
        "load_peak": load.peak,
        "after_load": load.end,
        "after_forward": load.rss(),
    }


def build_exports(overrides: list[str], directory: Path, value_dtype: str | None) -> dict[str, Any]:
    """Write the teacher (fp32) and the configured student's export (its values in ``value_dtype``, if
    given) under ``directory``."""
    from hydra import compose, initialize_config_module

    import dmt.config  # noqa: F401  (registers the ${pkg:...} resolver)
    from dmt.config import validate_config
    from dmt.model.loading import load_teacher, load_tokenizer
    from dmt.model.persistence import cast_memory_values, save_pretrained
    from dmt.model.surgery import build_student, count_parameters

    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("distill", overrides=overrides)
    layer_configs = validate_config(cfg)
    tokenizer = load_tokenizer(cfg.teacher)
    teacher = load_teacher(cfg.teacher)  # fp32: a GGUF teacher is dequantised on loading
    teacher.save_pretrained(directory / "teacher")
    tokenizer.save_pretrained(directory / "teacher")
    student = build_student(teacher, layer_configs)
    if value_dtype is not None:
        cast_memory_values(student, value_dtype)
    save_pretrained(student, tokenizer, directory / "student")
    weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return {
        "teacher_parameters": count_parameters(teacher),
        "teacher_fp32_weight_bytes": weights,
        "student_dense_parameters": count_parameters(student),
    }


def run(overrides: list[str], keep: Path | None, value_dtype: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = keep or Path(tmp)
        report: dict[str, Any] = {"overrides": overrides, "value_dtype": value_dtype}
        report |= build_exports(overrides, directory, value_dtype)
        report["export_bytes"] = {name: directory_bytes(directory / name) for name in ("teacher", "student")}
        report["student_store_bytes"] = directory_bytes(directory / "student" / "memory")
        report["resident_bytes"] = {}
        for loader in LOADERS:
            target = directory / ("teacher" if loader == "teacher" else "student")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(directory / "hf_modules")}
            result = subprocess.run(
                [sys.executable, "-m", "dmt.bench.footprint", "--measure", loader, str(target)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if result.returncode:
                raise RuntimeError(f"measuring {loader} failed:\n{result.stderr[-3000:]}")
            report["resident_bytes"][loader] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def table(report: dict[str, Any]) -> str:
    mib = 2**20
    teacher, student = report["export_bytes"]["teacher"], report["export_bytes"]["student"]
    lines = [
        f"teacher fp32 weights {report['teacher_fp32_weight_bytes'] / mib:.1f} MiB",
        f"export bytes: teacher {teacher / mib:.1f} MiB, student {student / mib:.1f} MiB "
        f"({student / teacher:.3f}×; stores {report['student_store_bytes'] / mib:.1f} MiB)",
        f"{'loader':<22}{'load Δ MiB':>12}{'forward Δ MiB':>15}{'total MiB':>11}",
    ]
    for loader, rss in report["resident_bytes"].items():
        lines.append(
            f"{loader:<22}{(rss['after_load'] - rss['after_imports']) / mib:>12.1f}"
            f"{(rss['after_forward'] - rss['after_imports']) / mib:>15.1f}{rss['after_forward'] / mib:>11.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dmt.bench.footprint", description=__doc__.splitlines()[0]
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the distill config")
    parser.add_argument("--out", type=Path, default=Path("footprint.json"), help="JSON report path")
    parser.add_argument("--value-dtype", help="export the student's memory values in this dtype (float16)")
    parser.add_argument("--keep", type=Path, help="write the exports here instead of a temporary directory")
    parser.add_argument("--measure", choices=LOADERS, help=argparse.SUPPRESS)  # the fresh-process half
    args = parser.parse_args(argv)
    if args.measure:  # the positional argument is then the directory to load
        print(json.dumps(measure(args.measure, Path(args.overrides[0]))))
        return
    report = run(args.overrides, args.keep, args.value_dtype)
    report["command"] = " ".join(
        ["python -m dmt.bench.footprint", *(argv if argv is not None else sys.argv[1:])]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
