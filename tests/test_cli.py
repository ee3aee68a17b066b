"""The commands as a user meets them: every ordinary mistake ends with exit status 2 and one line on
stderr naming the culprit, no traceback, and every file that existed before is byte-identical after.

Each row runs a command's real ``main`` in this process (``sys.argv`` set for the Hydra apps).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_student, tiny_teacher_cfg, write_checkpoint

import dmt.distill.run
import dmt.evaluation.__main__
import dmt.evaluation.long_document
import dmt.export
from dmt.bench.cli import main as bench_main
from dmt.distill.cli import distill_main
from dmt.evaluation.__main__ import main as eval_main
from dmt.evaluation.long_document import main as long_document_main
from dmt.export import main as export_main
from dmt.inspect import main as inspect_main
from dmt.model.loading import load_teacher
from dmt.model.persistence import save_pretrained

TOKENS = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
TINY_TEACHER = [
    "teacher=tiny_gpt2",
    *(f"teacher.random_init.{k}={v}" for k, v in tiny_teacher_cfg().random_init.items()),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a distillation checkpoint of a tiny student, and its export beside it."""
    run = tmp_path_factory.mktemp("run")
    student = tiny_student(load_teacher(tiny_teacher_cfg()), TOKENS)
    (run / "checkpoints").mkdir()
    write_checkpoint(student, run / "checkpoints" / "last.ckpt", tiny_teacher_cfg())
    save_pretrained(student, None, run / "export")
    return run / "checkpoints" / "last.ckpt"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(main: Callable[..., object], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``main`` as its console script would run it; returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["dmt-test", *argv])
    try:
        main(argv) if main in (export_main, inspect_main, bench_main) else main()
    except SystemExit as exit:
        return 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    return 0


class Pickled:
    """An object a checkpoint might hold: loading it would run code, so a weights-only load refuses it."""


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's working directory, holding their own files; the commands run from it."""
    (tmp_path / "thesis.txt").write_text("three years of work\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "story.txt").write_text("Once upon a time there was a memory. " * 40)
    (tmp_path / "taken.json").write_text('{"mine": true}\n')
    torch.save({"state_dict": {}, "dmt": Pickled()}, tmp_path / "pickled.ckpt")  # runs code when loaded
    monkeypatch.chdir(tmp_path)
    return tmp_path


def bad_export(root: Path, ckpt: Path) -> Path:
    """A copy of the checkpoint's export whose config.json is cut short."""
    export = root / "broken_export"
    export.mkdir()
    for path in (ckpt.parents[1] / "export").iterdir():
        if path.is_file():
            data = path.read_bytes()
            (export / path.name).write_bytes(data[: len(data) // 2] if path.name == "config.json" else data)
    return export


# (id, command, argv with {ckpt}/{run}/{export}/{broken} placeholders, fragment the message must hold)
ROWS = [
    ("export into a folder of the user's", export_main, ["{ckpt}", "."], "current directory"),
    ("export into a non-empty folder", export_main, ["{ckpt}", "{run}"], "holds"),
    ("export over its own checkpoint, forced", export_main, ["{ckpt}", "{run}", "--force"], "last.ckpt"),
    ("export onto a file", export_main, ["{ckpt}", "thesis.txt"], "thesis.txt is a file"),
    (
        "export of a text file",
        export_main,
        ["notes.md", "out"],
        "notes.md: cannot be read as a dmt checkpoint: not a PyTorch checkpoint file",
    ),
    (
        "export of a checkpoint holding objects",
        export_main,
        ["pickled.ckpt", "out"],
        "pickled.ckpt: cannot be read as a dmt checkpoint: it holds Python objects",
    ),
    ("export of a missing file", export_main, ["nope.ckpt", "out"], "nope.ckpt"),
    (
        "distill swap.read.topk=-1",
        distill_main,
        ["debug=fast", "swap.read.topk=-1"],
        "swap.read.topk: must be >= 1, got -1",
    ),
    (
        "distill swap.store.capacity=0",
        distill_main,
        ["debug=fast", "swap.store.capacity=0"],
        "swap.store.capacity",
    ),
    (
        "distill swap.read.metric=foo",
        distill_main,
        ["debug=fast", "swap.read.metric=foo"],
        "swap.read.metric",
    ),
    (
        "distill a flat key",
        distill_main,
        ["debug=fast", "swap.topk=16"],
        "swap.topk: moved to swap.read.topk",
    ),
    (
        "distill a key in another group",
        distill_main,
        ["debug=fast", "+swap.read.capacity=8"],
        "swap.read.capacity: not a read setting; it is swap.store.capacity",
    ),
    (
        "distill a faiss setting with hnsw",
        distill_main,
        ["debug=fast", "swap/index=hnsw", "+swap.index.nprobe=4"],
        "swap.index.nprobe: not a setting of the hnsw backend",
    ),
    (
        "distill binary text",
        distill_main,
        ["debug=fast", "data.paths=[binary.txt]"],
        "binary.txt: not a text",
    ),
    ("eval missing student", eval_main, [*TINY_TEACHER, "student=gone"], "student=gone"),
    ("eval binary text", eval_main, [*TINY_TEACHER, "texts=[binary.txt]"], "binary.txt: not a text file"),
    ("eval empty text", eval_main, [*TINY_TEACHER, "texts=[empty.txt]"], "empty.txt: the file is empty"),
    ("eval existing output", eval_main, [*TINY_TEACHER, "output=taken.json"], "taken.json exists"),
    ("eval stride 0", eval_main, [*TINY_TEACHER, "stride=0"], "stride: must lie in"),
    ("eval truncated config", eval_main, [*TINY_TEACHER, "student={broken}"], "config.json: not valid JSON"),
    ("long document, none", long_document_main, [*TINY_TEACHER, "student={export}"], "document: required"),
    (
        "long document, binary",
        long_document_main,
        [*TINY_TEACHER, "student={export}", "document=binary.txt"],
        "binary.txt: not a text file",
    ),
    (
        "long document, pack on disk",
        long_document_main,
        [
            *TINY_TEACHER,
            "student={export}",
            "document=binary.txt",
            "memory=p",
            "memory_index={{backend:disk}}",
        ],
        "memory_index: backend disk reads a pack read-only",
    ),
    ("inspect truncated config", inspect_main, ["{broken}"], "config.json: not valid JSON"),
    (
        "inspect no memory layer there",
        inspect_main,
        ["{export}", "--layer", "1"],
        "--layer 1 is not a memory",
    ),
    ("inspect existing json", inspect_main, ["{export}", "--json", "taken.json"], "taken.json exists"),
    ("bench existing out", bench_main, ["--quick", "--out", "taken.json"], "taken.json exists"),
]


@pytest.mark.parametrize(("command", "argv", "fragment"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_mistake_is_one_named_line(
    command: Callable[..., object],
    argv: list[str],
    fragment: str,
    checkpoint: Path,
    user_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    places = {
        "ckpt": checkpoint,
        "run": checkpoint.parents[1],
        "export": checkpoint.parents[1] / "export",
        "broken": bad_export(user_dir, checkpoint),
    }
    argv = [arg.format(**places) for arg in argv]
    if command is distill_main:
        argv.append(f"hydra.run.dir={user_dir / 'outputs' / 'run'}")
    # No command needs the teacher's weights to find these mistakes: loading them fails the test.
    for module in (dmt.distill.run, dmt.evaluation.__main__, dmt.evaluation.long_document):
        monkeypatch.setattr(module, "load_teacher", lambda *_: pytest.fail("teacher loaded"))
    before = snapshot(user_dir), snapshot(places["run"])

    status = run(command, argv, monkeypatch)

    out, err = capsys.readouterr()
    assert status == 2, out + err
    assert fragment in err, err
    assert "Traceback" not in out + err and "weights_only=False" not in out + err
    assert len(err.strip().splitlines()) <= 2, err
    assert "tensorboard" not in out  # no run was announced
    assert (snapshot(user_dir), snapshot(places["run"])) == before  # nothing changed, nothing left behind


def test_export_replaces_a_previous_export_and_follows_the_umask(
    checkpoint: Path, user_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_umask = os.umask(0o027)
    try:
        assert run(export_main, [str(checkpoint), "out"], monkeypatch) == 0
        (user_dir / "out" / "config.json").write_text(
            json.dumps({**json.loads((user_dir / "out" / "config.json").read_text()), "marker": 1})
        )
        assert (
            run(export_main, [str(checkpoint), "out", "--quiet"], monkeypatch) == 0
        )  # a dmt export: replaced
    finally:
        os.umask(old_umask)
    assert "marker" not in json.loads((user_dir / "out" / "config.json").read_text())
    for path in [user_dir / "out", *(user_dir / "out").rglob("*")]:
        expected = 0o750 if path.is_dir() else 0o640
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert sorted(p.name for p in user_dir.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_export_force_replaces_a_folder_of_the_user(checkpoint: Path, user_dir: Path, monkeypatch) -> None:
    (user_dir / "old").mkdir()
    (user_dir / "old" / "draft.txt").write_text("replace me")
    assert run(export_main, [str(checkpoint), "old", "--force"], monkeypatch) == 0
    assert (user_dir / "old" / "config.json").is_file() and not (user_dir / "old" / "draft.txt").exists()


def test_debug_keeps_the_traceback(checkpoint: Path, user_dir: Path, monkeypatch) -> None:
    with pytest.raises(FileExistsError, match="current directory"):
        export_main([str(checkpoint), ".", "--debug"])


def test_eval_writes_into_its_run_directory(
    checkpoint: Path, user_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_dir = user_dir / "outputs" / "eval"
    argv = [
        *TINY_TEACHER,
        f"student={checkpoint.parents[1] / 'export'}",
        "texts=[story.txt]",
        "window=32",
        "stride=16",
        "prompts=[]",
        f"hydra.run.dir={run_dir}",
    ]
    before = snapshot(user_dir)
    assert run(eval_main, argv, monkeypatch) == 0
    written = json.loads((run_dir / "eval.json").read_text())
    assert [row["name"] for row in written["rows"]] == ["teacher", "student", "ablated"]
    assert f"written: {run_dir / 'eval.json'}" in capsys.readouterr().out
    after = snapshot(user_dir)
    assert {k: v for k, v in after.items() if not k.startswith("outputs")} == before  # nothing else written


@pytest.mark.parametrize(
    ("script", "accepted", "refused"),
    [
        (eval_main, ["teacher:", "data:"], ["experiment", "swap:"]),
        (distill_main, ["swap:", "experiment:"], []),
    ],
)
def test_help_lists_what_the_command_accepts(script, accepted, refused, monkeypatch, capsys) -> None:
    assert run(script, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith("example: dmt-")
    assert all(word in out for word in accepted) and not any(word in out for word in refused)


def test_eval_help_names_every_option_of_its_groups(monkeypatch, capsys) -> None:
    from dmt.conf import CONF_DIR

    run(eval_main, ["--help"], monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    for group in ("teacher", "data"):
        listed = next(line for line in lines if line.startswith(f"{group}: ") and "," in line)
        named = listed.split(":", 1)[1].split("(")[0].replace(",", " ").split()
        assert named == sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def test_usage_line_shows_the_command_typed(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["dmt-export", "--help"])
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: dmt-export ")
    monkeypatch.setattr(sys, "argv", [dmt.export.__file__, "--help"])
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m dmt.export ")
