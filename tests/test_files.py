"""Outputs written aside and renamed into place, strict JSON, and text inputs checked (``dmt.files``)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from dmt.distill.run import measured
from dmt.errors import InputFileError, OutputExistsError
from dmt.files import (
    atomic_file,
    check_directory_target,
    read_text_file,
    refuse_existing_file,
    write_directory,
    write_json,
)


def test_json_holds_null_where_a_number_was_not_finite(tmp_path: Path) -> None:
    path = write_json(tmp_path / "summary.json", {"ppl": float("nan"), "rows": [1.5, float("inf")], "n": 2})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda constant: pytest.fail(constant)) == {
        "ppl": None,
        "rows": [1.5, None],
        "n": 2,
        "not_finite": {"paths": ["ppl", "rows[1]"], "why": "the value was NaN or infinite"},
    }
    assert measured(None) == "not measured (no validation ran)" and measured(41.234) == "41.23"


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "private.json", {})
        write_directory(tmp_path / "dir", lambda d: (d / "f").write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o700
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "shared.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644


def test_a_failed_directory_write_leaves_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "out"
    write_directory(target, lambda d: (d / "a").write_text("first"))

    def failing(directory: Path) -> None:
        (directory / "a").write_text("second")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"saving to {target} failed: No space left"):
        write_directory(target, failing)
    assert (target / "a").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("layout", "force", "fragment"),
    [
        ("user files", False, "is not empty and is not a dmt export (it holds notes.md, thesis.txt)"),
        ("a file", False, "is a file, not a directory"),
        ("a file", True, "is a file, not a directory"),
        ("holds the input", True, "an input of this command"),
        ("the current directory", True, "the current directory"),
        ("above the current directory", True, "the current directory"),
    ],
)
def test_directory_targets_that_would_lose_files_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, force: bool, fragment: str
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "thesis.txt").write_text("mine")
    (target / "notes.md").write_text("mine")
    checkpoint = target / "run" / "last.ckpt"
    if layout == "a file":
        target = target / "thesis.txt"
    elif layout == "holds the input":
        checkpoint.parent.mkdir()
        checkpoint.write_text("weights")
    elif layout == "the current directory":
        monkeypatch.chdir(target)
    elif layout == "above the current directory":
        (target / "deeper").mkdir()
        monkeypatch.chdir(target / "deeper")
    with pytest.raises(OutputExistsError, match=re.escape(fragment)):
        check_directory_target(target, lambda _: False, "dmt export", force=force, keep=[checkpoint])


def test_a_previous_output_or_force_may_be_replaced(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    check_directory_target(tmp_path / "old", lambda d: (d / "config.json").exists(), "dmt export")
    check_directory_target(tmp_path / "old", lambda _: False, "dmt export", force=True)
    check_directory_target(tmp_path / "new", lambda _: False, "dmt export")  # missing: fine


def test_an_existing_output_file_needs_force(tmp_path: Path) -> None:
    (tmp_path / "eval.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="eval.json exists; .* force=true"):
        refuse_existing_file(tmp_path / "eval.json", force=False)
    refuse_existing_file(tmp_path / "eval.json", force=True)
    with pytest.raises(OutputExistsError, match="is a directory"):
        refuse_existing_file(tmp_path, force=True)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "the file is empty"),
        (b" \n\t\n", "the file is empty"),
        (b"PK\x03\x04\x00\x00binary", "2 NUL bytes"),
        (bytes(range(1, 32)) * 50 + b"some words", "control characters"),
        (bytes(range(128, 256)) * 20, "not UTF-8"),
    ],
)
def test_what_is_not_text_is_refused_naming_the_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=rf"input\.txt: .*{fragment}"):
        read_text_file(path)


def test_text_in_another_encoding_is_read(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("Où est le café ? Très bien, à bientôt. ".encode("latin-1") * 20)
    assert read_text_file(path).startswith("O\ufffd est le caf\ufffd")
    assert read_text_file(path, fallback_encoding="latin-1").startswith("Où est le café")
    with pytest.raises(InputFileError, match="missing.txt: cannot be read"):
        read_text_file(tmp_path / "missing.txt")
