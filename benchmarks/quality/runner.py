"""Run the quality comparison: one ``dmt-distill experiment=quality_<configuration>_<variant>`` per run.

Each run is a subprocess (a fresh process per run: no state, cache or memory carried between runs) in
``<out>/runs/<configuration>_<variant>/``, which is also its Hydra run directory. The training budget is
passed to every run as ``trainer.max_time`` (and ``trainer.max_steps`` if given); the runner records the
command, exit status and wall time in ``quality_run.json`` and the output in ``run.log``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.quality.collect import RUN_RECORD, VARIANTS
from dmt.conf import CONF_DIR

EXPERIMENTS = CONF_DIR / "experiment"


def configurations() -> list[str]:
    """Configurations with a ``quality_<name>_memory`` experiment (``all``, ``upper``, ...)."""
    files = EXPERIMENTS.glob("quality_*_memory.yaml")
    return sorted(path.stem[len("quality_") : -len("_memory")] for path in files)


def experiment_name(configuration: str, variant: str) -> str:
    return f"quality_{configuration}_{variant}"


def max_time(minutes: float) -> str:
    """Lightning's ``max_time`` string ``DD:HH:MM:SS`` for a budget in minutes (whole seconds, >= 1)."""
    if not minutes > 0:
        raise ValueError(f"--budget-minutes: must be > 0, got {minutes}")
    seconds = max(1, round(minutes * 60))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    mins, seconds = divmod(seconds, 60)
    return f"{days:02d}:{hours:02d}:{mins:02d}:{seconds:02d}"


def distill_command(
    experiment: str,
    run_dir: Path,
    budget_minutes: float,
    max_steps: int | None = None,
    overrides: Sequence[str] = (),
) -> list[str]:
    """The ``dmt-distill`` command line of one run; ``overrides`` (Hydra syntax) come last and win.

    ``python -m`` with this interpreter, so that the run uses the same installation of dmt.
    """
    command = [
        sys.executable,
        "-m",
        "dmt.distill",
        f"experiment={experiment}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_time={max_time(budget_minutes)}",
    ]
    if max_steps is not None:
        command.append(f"trainer.max_steps={max_steps}")
    return command + list(overrides)


def run_one(
    configuration: str,
    variant: str,
    out_dir: Path,
    budget_minutes: float,
    max_steps: int | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """Run one configuration/variant into ``<out_dir>/runs/<configuration>_<variant>``; return that path.

    A finished run (``summary.json``) made by the same command is kept and not run again unless
    ``force``, so an interrupted comparison picks up where it stopped; any other earlier run there,
    which must have been made by this runner (it has ``quality_run.json``), is replaced.
    """
    run_dir = (out_dir / "runs" / f"{configuration}_{variant}").resolve()
    experiment = experiment_name(configuration, variant)
    command = distill_command(experiment, run_dir, budget_minutes, max_steps, overrides)
    record_path = run_dir / RUN_RECORD
    if run_dir.exists():
        if not record_path.is_file():
            raise FileExistsError(f"{run_dir} exists but was not written by benchmarks.quality; move it away")
        previous = json.loads(record_path.read_text())
        if not force and previous.get("command") == command and (run_dir / "summary.json").is_file():
            print(f"  {run_dir.name}: finished earlier with the same command, kept")
            return run_dir
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    record = {
        "configuration": configuration,
        "variant": variant,
        "experiment": experiment,
        "budget_minutes": budget_minutes,
        "max_steps": max_steps,
        "overrides": list(overrides),
        "command": command,
    }
    # Written before the run too, so that a run killed midway is recognised (and replaced) next time.
    record_path.write_text(json.dumps(record, indent=2))
    print(f"  {run_dir.name}: running (log {run_dir / 'run.log'})", flush=True)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # run.log follows the run as it goes
    with open(run_dir / "run.log", "w") as log:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    returncode = process.returncode
    record.update(returncode=returncode, wall_seconds=time.monotonic() - started)
    record_path.write_text(json.dumps(record, indent=2))
    status = "done" if returncode == 0 else f"FAILED (exit {returncode}; see run.log)"
    print(f"  {run_dir.name}: {status} in {record['wall_seconds'] / 60:.1f} min", flush=True)
    return run_dir


def run_comparison(
    configs: Sequence[str],
    out_dir: Path,
    budget_minutes: float,
    max_steps: int | None = None,
    variants: Sequence[str] = VARIANTS,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> list[Path]:
    """Every variant of every configuration, one after the other; the run directories, in order."""
    known = configurations()
    unknown = [c for c in configs if c not in known]
    if unknown:
        raise ValueError(f"--configs: no quality_<name>_memory experiment for {unknown}; have {known}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {bad}; expected some of {VARIANTS}")
    max_time(budget_minutes)  # fails now, not after the first run, on a bad budget
    plan = [(c, v) for c in configs for v in variants]
    run_dirs = []
    for number, (configuration, variant) in enumerate(plan, start=1):
        print(f"[{number}/{len(plan)}] {experiment_name(configuration, variant)}", flush=True)
        run_dirs.append(run_one(configuration, variant, out_dir, budget_minutes, max_steps, overrides, force))
    return run_dirs
