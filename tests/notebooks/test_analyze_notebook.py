"""``notebooks/analyze_run.ipynb`` runs headless on a synthetic run directory and saves its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import REPO, tiny_student
from nbclient import NotebookClient

from dmt.evaluation.evaluate import evaluate
from dmt.model.persistence import save_pretrained

NOTEBOOK = REPO / "notebooks" / "analyze_run.ipynb"
KERNEL = "dmt-test-python"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings."


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec running this interpreter, found first through JUPYTER_PATH.

    Whatever ``python3`` kernel the machine has (user-wide, system, another venv), the notebook then runs
    with the packages of the interpreter running the tests, and nothing is installed anywhere.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "dmt tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def write_run_dir(run_dir: Path, eval_result: dict) -> None:
    """Scalars with the tags the distillation run logs, plus ``eval.json``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step in range(0, 20):
        for tag, value in {
            "loss": 5 - step / 10,
            "kd": 3 - step / 20,
            "ce": 4 - step / 15,
            "hidden": 0.5,
        }.items():
            writer.add_scalar(f"train/{tag}", value, step)
        for layer in (1, 3):
            writer.add_scalar(f"memory/layer_{layer:02d}/entries", min(10 * step, 150), step)
            writer.add_scalar(f"memory/layer_{layer:02d}/evictions_per_step", 10 * (step >= 15), step)
        if step % 5 == 4:
            writer.add_scalar("val/ppl_student", 80 - step, step)
            writer.add_scalar("val/ppl_teacher", 40.0, step)
    writer.close()
    (run_dir / "eval.json").write_text(json.dumps(eval_result))


def write_export(export_dir: Path, teacher, tokenizer) -> None:
    """A student whose memory layers were filled by one training forward and read by two more."""
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids  # (1, T)
    tokens = torch.cat([tokens, tokens.flip(1)])  # (2, T)
    student = tiny_student(teacher, tokens).train()
    with torch.no_grad():
        for _ in range(2):
            student(tokens)
    save_pretrained(student.eval(), tokenizer, export_dir)


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)


def test_notebook_runs_and_saves_plots(tmp_path, monkeypatch, venv_kernel, tiny_gpt2, gpt2_tokenizer):
    run_dir = tmp_path / "run"
    result = evaluate(
        tiny_gpt2,
        gpt2_tokenizer,
        [TEXT],
        ablate_layers=[1, 3],
        window=16,
        stride=8,
        batch_size=2,
        generation_prompts=["ROMEO:"],
        max_new_tokens=3,
    )
    write_run_dir(run_dir, result)
    write_export(run_dir / "export", tiny_gpt2, gpt2_tokenizer)
    monkeypatch.setenv("DMT_RUN_DIR", str(run_dir))  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "Agg")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=venv_kernel,
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    plots = run_dir / "plots"
    for name in ("losses", "val_perplexity", "memory", "memory_use", "memory_age", "eval_perplexity"):
        path = plots / f"{name}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "skipped" not in outputs and str(run_dir) in outputs
