"""The pack commands as a user meets them: dmt-memorize, dmt-forget, dmt-inspect PACK, and packs named to
dmt-eval; a mistake ends with one named line, and a killed dmt-memorize leaves a pack it resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_teacher_cfg

from dmt.evaluation.__main__ import main as eval_main
from dmt.evaluation.long_document import main as long_document_main
from dmt.evaluation.perplexity import windows
from dmt.forget import main as forget_main
from dmt.index import main as index_main
from dmt.inspect import main as inspect_main
from dmt.kernel.pack_files import SHARDS
from dmt.memorize import main as memorize_main
from dmt.model.loading import load_teacher
from dmt.model.persistence import save_pretrained
from dmt.model.surgery import build_student, resolve_layer_configs
from dmt.packs import read_pack

PLAN = {"blocks": [3], "type": "associative", "heads": 2, "key_dim": 8, "topk": 4, "capacity": 64}
TINY_TEACHER = [
    "teacher=tiny_gpt2",
    *(f"teacher.random_init.{k}={v}" for k, v in tiny_teacher_cfg().random_init.items()),
]
SMALL = ["window=32", "stride=16", "quiet=true"]


def export_of(path: Path, tokenizer, novelty_threshold: float | None = 0.0) -> Path:
    torch.manual_seed(0)
    teacher = load_teacher(tiny_teacher_cfg())
    configs = resolve_layer_configs({**PLAN, "novelty_threshold": novelty_threshold}, teacher.config)
    return save_pretrained(build_student(teacher, configs).eval(), tokenizer, path)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> Path:
    return export_of(tmp_path_factory.mktemp("student") / "export", gpt2_tokenizer)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's folder of notes, and the working directory."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"note{i}.txt").write_text(f"Note {i}: the memory holds what was read. " * (5 + i))
    monkeypatch.chdir(tmp_path)
    return notes


def run(main, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["dmt-test", *argv])
    try:
        main(argv) if main in (forget_main, index_main, inspect_main) else main()
    except SystemExit as exit:
        return 0 if exit.code is None else exit.code
    return 0


def test_memorize_forget_and_inspect_from_the_command_line(export, corpus, monkeypatch, capsys):
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    argv = [f"student={export}", f"corpus=[{corpus}]", "output=notes.pack", *SMALL]
    assert run(memorize_main, argv, monkeypatch) == 0
    assert "memorised 3 documents" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before  # the student as it was
    names = [d.name for d in read_pack("notes.pack").documents]
    assert names == ["notes/note0.txt", "notes/note1.txt", "notes/note2.txt"]
    assert run(memorize_main, argv, monkeypatch) == 0  # a rerun has nothing left to read
    assert "memorised 0 documents (3 already in the pack)" in capsys.readouterr().out
    assert run(inspect_main, ["notes.pack"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and "notes/note1.txt" in out
    assert run(forget_main, ["notes.pack", "--source", "notes/note1*"], monkeypatch) == 0
    assert "forgot 1 documents" in capsys.readouterr().out
    assert [d.name for d in read_pack("notes.pack").documents] == ["notes/note0.txt", "notes/note2.txt"]
    assert all(p.read_text().startswith("Note") for p in corpus.iterdir())  # the corpus as it was


def test_inspect_counts_the_reads_of_each_documents_entries(export, corpus, monkeypatch, capsys):
    Path("other.txt").write_text("zebra quantum violet harbour, " * 12)
    argv = [f"student={export}", f"corpus=[{corpus / 'note0.txt'},other.txt]", "output=two.pack", *SMALL]
    assert run(memorize_main, argv, monkeypatch) == 0
    reading = ["--student", str(export), "--window", "32", "--stride", "16", "--json"]
    assert run(inspect_main, ["two.pack", "--texts", "other.txt", *reading, "r.json"], monkeypatch) == 0
    assert "reads 3" in capsys.readouterr().out  # a column of the reads of block 3's entries
    report = json.loads(Path("r.json").read_text())
    reads = {d["document"]: d["reads"]["3"] for d in report["documents"]}
    assert reads["other.txt"] > reads["note0.txt"]  # a text read draws most on its own entries
    # Every read lands on some document: each position of each window queries topk entries per head (the
    # pack holds more than topk).
    positions = sum(end - begin for begin, end, _ in windows(report["documents"][1]["tokens"], 32, 16))
    assert sum(reads.values()) == positions * PLAN["heads"] * PLAN["topk"]
    assert report["perplexity"] > 1
    assert run(inspect_main, ["two.pack", "--texts", "other.txt"], monkeypatch) == 2  # --student missing
    assert "--student and --texts go together" in capsys.readouterr().err


def test_memorize_streams_a_datasets_dataset_as_its_files_would_read(export, corpus, monkeypatch, capsys):
    texts = {p.stem: p.read_text() for p in sorted(corpus.iterdir())}
    rows = [{"title": name, "body": text} for name, text in texts.items()]
    rows.insert(1, {"title": "blank", "body": "  \n"})  # a blank row is no document
    Path("notes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = ["dataset.path=json", "dataset.data_files=[notes.jsonl]", "dataset.text_column=body"]
    argv = [f"student={export}", *dataset, "dataset.name_column=title", "exclude=[note2]", "output=rows.pack"]
    assert run(memorize_main, [*argv, *SMALL], monkeypatch) == 0
    assert "memorised 2 documents" in capsys.readouterr().out
    assert run(memorize_main, [*argv, *SMALL], monkeypatch) == 0  # a rerun resumes: nothing left
    assert "memorised 0 documents (2 already in the pack)" in capsys.readouterr().out
    argv = [f"student={export}", f"corpus=[{corpus}]", "exclude=[notes/note2.txt]", "output=files.pack"]
    assert run(memorize_main, [*argv, *SMALL], monkeypatch) == 0
    streamed, listed = read_pack("rows.pack").documents, read_pack("files.pack").documents
    assert [d.name for d in streamed] == ["note0", "note1"]
    for row, file in zip(streamed, listed, strict=True):
        assert (row.digest, row.tokens, row.entries) == (file.digest, file.tokens, file.entries)
        row_arrays = sorted((Path("rows.pack") / SHARDS / row.shard).iterdir())
        file_arrays = sorted((Path("files.pack") / SHARDS / file.shard).iterdir())
        assert [p.name for p in row_arrays] == [p.name for p in file_arrays]
        for a, b in zip(row_arrays, file_arrays, strict=True):
            if a.suffix == ".npy":
                assert np.array_equal(np.load(a), np.load(b))
    # Unnamed rows are numbered: <dataset>/<row>.
    argv = [f"student={export}", *dataset, "output=numbered.pack"]
    assert run(memorize_main, [*argv, *SMALL], monkeypatch) == 0
    assert [d.name for d in read_pack("numbered.pack").documents] == ["json/0", "json/2", "json/3"]


def test_packs_merge_from_the_command_line(export, corpus, monkeypatch, capsys):
    for name in ("note0", "note2"):
        argv = [f"student={export}", f"corpus=[{corpus / name}.txt]", f"output={name}.pack", *SMALL]
        assert run(memorize_main, argv, monkeypatch) == 0
    assert (
        run(memorize_main, ["merge=[note0.pack,note2.pack]", "output=both.pack", "quiet=true"], monkeypatch)
        == 0
    )
    assert [d.name for d in read_pack("both.pack").documents] == ["note0.txt", "note2.txt"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["corpus=[notes]"], "student: required"),
        (["student={export}"], "corpus: required"),
        (["student={export}", "corpus=[empty.txt]"], "empty.txt: the file is empty"),
        (["student={export}", "corpus=[binary.txt]"], "binary.txt: not a text file"),
        (["student={export}", "corpus=[gone.txt]"], "corpus: gone.txt not found"),
        (["student={export}", "corpus=[notes]", "exclude=[x/*]"], "exclude: 'x/*' matches no document"),
        (["student={export}", "corpus=[notes]", "output=mine"], "is not empty and is not a memory pack"),
        (["student={plain}", "corpus=[notes]"], "experiment=associative_cache"),
        (["student={export}", "source=poetry"], "source: unknown source 'poetry'"),
        (["merge=[notes]", "output=both.pack"], "notes: not a memory pack"),
        (
            ["student={export}", "dataset.path=json", "dataset.data_files=[gone.jsonl]"],
            "dataset.path: cannot load 'json'",
        ),
        (
            [
                "student={export}",
                "dataset.path=json",
                "dataset.data_files=[rows.jsonl]",
                "dataset.text_column=body",
            ],
            "dataset.text_column: no column 'body'",
        ),
        (
            ["student={export}", "dataset.path=json", "dataset.data_files=[rows.jsonl]", "exclude=[json/*]"],
            "dataset: every row is blank or excluded",
        ),
    ],
)
def test_a_mistake_is_one_named_line(argv, fragment, export, corpus, gpt2_tokenizer, monkeypatch, capsys):
    (corpus.parent / "empty.txt").write_text(" \n")
    (corpus.parent / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (corpus.parent / "mine").mkdir()
    (corpus.parent / "mine" / "thesis.txt").write_text("mine")
    (corpus.parent / "rows.jsonl").write_text('{"text": "A row of text."}\n')
    plain = (
        export_of(corpus.parent / "plain", gpt2_tokenizer, novelty_threshold=None)
        if "{plain}" in argv[0]
        else None
    )
    argv = [arg.format(export=export, plain=plain) for arg in argv]
    assert run(memorize_main, [*argv, "quiet=true", "hydra.run.dir=run"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert (corpus.parent / "mine" / "thesis.txt").read_text() == "mine"


def test_forget_names_a_glob_that_matches_nothing(export, corpus, monkeypatch, capsys):
    assert run(memorize_main, [f"student={export}", "corpus=[notes]", "output=p", *SMALL], monkeypatch) == 0
    assert run(forget_main, ["p", "--source", "other/*"], monkeypatch) == 2
    assert "--source: other/* matches no document of p" in capsys.readouterr().err
    assert run(forget_main, ["p", "--source", "notes/*", "--dry-run"], monkeypatch) == 0
    assert len(read_pack("p").documents) == 3


def test_index_names_a_missing_pack_and_a_bad_nlist(export, corpus, monkeypatch, capsys):
    assert run(index_main, ["nowhere"], monkeypatch) == 2
    assert "nowhere: no such memory pack directory" in capsys.readouterr().err
    assert run(memorize_main, [f"student={export}", "corpus=[notes]", "output=p", *SMALL], monkeypatch) == 0
    assert run(index_main, ["p", "--nlist", "0"], monkeypatch) == 2
    assert "--nlist: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert run(index_main, ["p", "--nlist", "100000"], monkeypatch) == 2
    assert "--nlist: 100000 lists for" in capsys.readouterr().err
    assert not (Path("p") / "index").exists()


def test_eval_refuses_a_pack_of_another_student_naming_both(
    export, corpus, gpt2_tokenizer, monkeypatch, capsys
):
    assert run(memorize_main, [f"student={export}", "corpus=[notes]", "output=p", *SMALL], monkeypatch) == 0
    teacher = load_teacher(tiny_teacher_cfg())
    other = build_student(teacher, resolve_layer_configs({**PLAN, "novelty_threshold": 0.0}, teacher.config))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # another student: one weight differs
    save_pretrained(other.eval(), gpt2_tokenizer, "other")
    argv = [
        *TINY_TEACHER,
        "student=other",
        "memory=p",
        "texts=[notes]",
        "window=64",
        "stride=32",
        "output=e.json",
        "quiet=true",
    ]
    assert run(eval_main, [*argv, "hydra.run.dir=run"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"made for student {export}" in err and "student other" in err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("memory_index=5", "memory_index: expected index settings such as {backend: faiss}, got 5"),
        ("memory_index={backend:usearch}", "memory_index: unknown index backend 'usearch'"),
    ],
)
def test_a_bad_memory_index_is_named(export, corpus, monkeypatch, capsys, setting, message):
    assert run(memorize_main, [f"student={export}", "corpus=[notes]", "output=p", *SMALL], monkeypatch) == 0
    argv = [
        *TINY_TEACHER,
        f"student={export}",
        "memory=p",
        setting,
        "texts=[notes]",
        "window=64",
        "stride=32",
    ]
    assert run(eval_main, [*argv, "output=e.json", "quiet=true", "hydra.run.dir=run"], monkeypatch) == 2
    assert message in capsys.readouterr().err


def test_a_killed_memorize_leaves_a_pack_that_a_rerun_completes(export, tmp_path):
    """``kill -9`` while documents are being read: the pack lists the finished ones and loads; running
    the same command again reads the rest, giving the pack an uninterrupted run gives."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"d{i:02d}.txt").write_text(f"Document {i} says something of its own. " * 12)
    command = [sys.executable, "-m", "dmt.memorize", f"student={export}", f"corpus=[{corpus}]", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pack = tmp_path / "pack"
    process = subprocess.Popen([*command, f"output={pack}", "hydra.run.dir=run"], cwd=tmp_path, env=env)
    try:
        while process.poll() is None:
            listed = (
                json.loads((pack / "pack.json").read_text())["documents"]
                if (pack / "pack.json").exists()
                else []
            )
            if len(listed) >= 2:
                break
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed = read_pack(pack)
    assert 2 <= len(killed.documents) < 24 or process.returncode == 0
    subprocess.run([*command, f"output={pack}", "hydra.run.dir=run"], cwd=tmp_path, env=env, check=True)
    subprocess.run(
        [*command, f"output={tmp_path / 'whole'}", "hydra.run.dir=run"], cwd=tmp_path, env=env, check=True
    )
    resumed, whole = read_pack(pack), read_pack(tmp_path / "whole")
    strip = [(d.name, d.digest, d.entries) for d in resumed.documents]
    assert strip == [(d.name, d.digest, d.entries) for d in whole.documents]
    assert sorted(p.name for p in (pack / "shards").iterdir()) == sorted(d.shard for d in resumed.documents)


def test_a_long_document_is_read_with_a_pack(export, corpus, monkeypatch, capsys):
    assert run(memorize_main, [f"student={export}", "corpus=[notes]", "output=p", *SMALL], monkeypatch) == 0
    argv = [*TINY_TEACHER, f"student={export}", "memory=p", "document=notes/note2.txt", *SMALL]
    assert run(long_document_main, [*argv, "output=ld.json", "hydra.run.dir=run"], monkeypatch) == 0
    rows = json.loads(Path("ld.json").read_text())["rows"]
    inserting = next(row for row in rows if row["name"] == "student, inserting")
    assert inserting["entries_inserted"] > 0 and inserting["entries_evicted"] == 0  # room beside the pack
