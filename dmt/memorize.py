"""``dmt-memorize`` / ``python -m dmt.memorize``: read a corpus into a memory pack (``conf/memorize.yaml``).

dmt-memorize student=<export or .ckpt> corpus=[my_texts/] output=my.pack
dmt-memorize student=<export> source=shakespeare exclude=[shakespeare/hamlet_gut] output=plays.pack
dmt-memorize student=<export> dataset.path=json 'dataset.data_files=[notes.jsonl]' output=notes.pack
dmt-memorize merge=[a.pack,b.pack] output=both.pack
"""

from __future__ import annotations

import fnmatch
import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from datasets import IterableDataset, load_dataset
from omegaconf import DictConfig, OmegaConf

from dmt.cli import run_hydra_task
from dmt.conf import CONFIG_PATH  # (importing dmt.conf registers the configs' resolvers)
from dmt.data.corpus import SOURCES, read_source
from dmt.errors import ConfigError
from dmt.evaluation.perplexity import check_windows
from dmt.files import check_directory_target, read_text_file
from dmt.model.persistence import check_student_path, load_student
from dmt.packs.files import is_pack, merge_packs
from dmt.packs.reading import memorize, open_pack, pack_manifest
from dmt.progress import progress_bar, set_quiet


def corpus_files(paths: list[str], glob: str) -> list[tuple[str, Path]]:
    """``(name, file)`` of each document named by ``paths``: a file is named by its file name, a folder's
    files (matching ``glob``, recursively) by the folder's name and their path inside it."""
    files: dict[str, Path] = {}
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob(glob) if p.is_file())
            if not matches:
                raise FileNotFoundError(f"corpus: no file matching {glob!r} in folder {path}")
            files |= {f"{path.absolute().name}/{p.relative_to(path).as_posix()}": p for p in matches}
        elif path.is_file():
            files[path.name] = path
        else:
            raise FileNotFoundError(f"corpus: {path} not found")
    return list(files.items())


def corpus_documents(cfg: DictConfig) -> tuple[list[tuple[str, Any]], int]:
    """The documents to read, as ``(name, file or text)``, the ones ``exclude`` names left out, and their
    characters in all (for the progress bar's estimate); texts of files are read one at a time later, and
    the rows of ``dataset`` are streamed (:func:`dataset_documents`), not listed here."""
    if not cfg.corpus and cfg.source is None and cfg.dataset.path is None:
        raise ConfigError(
            "corpus: required; give corpus=[<files or folders>], source=<name> or dataset.path=<dataset>"
        )
    documents: list[tuple[str, Any]] = corpus_files(list(cfg.corpus), cfg.corpus_glob)
    if cfg.source is not None:
        if cfg.source not in SOURCES:
            raise ConfigError(f"source: unknown source {cfg.source!r}; known: {', '.join(SOURCES)}")
        documents += [(document.name, document.text) for document in read_source(cfg.source)]
    if cfg.dataset.path is None:  # a dataset's names are known only once streamed
        excluded = [p for p in cfg.exclude if not any(fnmatch.fnmatchcase(n, p) for n, _ in documents)]
        if excluded:
            raise ConfigError(f"exclude: {excluded[0]!r} matches no document of the corpus")
    documents = [(n, d) for n, d in documents if not excluded_name(n, cfg.exclude)]
    if not documents and cfg.dataset.path is None:
        raise ConfigError("corpus: every document is excluded; nothing to memorise")
    for _, document in documents:  # an empty or binary file is named before the student loads
        if isinstance(document, Path):
            read_text_file(document)
    return documents, sum(characters(document) for _, document in documents)


def excluded_name(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def open_dataset(cfg: DictConfig) -> IterableDataset:
    """``cfg.dataset`` as ``load_dataset(path, name, data_files=..., split=..., streaming=True)``: rows are
    read as they are memorised, so RAM does not grow with the dataset. Checked on its first row.

    Raises:
        ConfigError: the dataset cannot be loaded, is empty, or lacks the text or name column.
    """
    spec = cfg.dataset
    data_files = spec.data_files
    if OmegaConf.is_config(data_files):
        data_files = OmegaConf.to_container(data_files)
    try:
        rows = load_dataset(spec.path, spec.name, data_files=data_files, split=spec.split, streaming=True)
        first = next(iter(rows), None)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ValueError, its own)
        raise ConfigError(
            f"dataset.path: cannot load {spec.path!r} ({type(error).__name__}: {error})"
        ) from error
    if first is None:
        raise ConfigError(
            f"dataset.path: {spec.path!r} (split {spec.split!r}) has no rows; nothing to memorise"
        )
    for key in ("text_column", "name_column"):
        column = spec[key]
        if column is not None and column not in first:
            raise ConfigError(
                f"dataset.{key}: no column {column!r} in {spec.path!r} (columns: {', '.join(first)})"
            )
    kind = type(first[spec.text_column]).__name__
    if kind != "str":
        raise ConfigError(f"dataset.text_column: column {spec.text_column!r} holds {kind}, not text")
    return rows


def dataset_documents(rows: IterableDataset, cfg: DictConfig) -> Iterator[tuple[str, str]]:
    """``(name, text)`` of each row of ``rows`` not excluded and not blank: named by
    ``dataset.name_column``, else ``<dataset>/<row number>``.

    Raises:
        ConfigError: two rows share a name (a pack's documents are told apart by name).
    """
    label = Path(str(cfg.dataset.path)).name
    seen: set[str] = set()
    for number, row in enumerate(rows):
        column = cfg.dataset.name_column
        name = str(row[column]) if column is not None else f"{label}/{number}"
        if name in seen:
            raise ConfigError(f"dataset.name_column: the name {name!r} is given to two rows (row {number})")
        seen.add(name)
        text = row[cfg.dataset.text_column]
        if text and not text.isspace() and not excluded_name(name, cfg.exclude):
            yield name, text


def characters(document: Path | str) -> int:
    """The size of a document: a file's bytes, or a text's characters."""
    return document.stat().st_size if isinstance(document, Path) else len(document)


def run_memorize(cfg: DictConfig) -> dict[str, Any]:
    """The whole command from a composed ``memorize`` config; everything named is checked before the
    student loads. Returns a summary, also printed."""
    if cfg.get("quiet"):
        set_quiet()
    target = Path(cfg.output)
    if cfg.merge:
        sources = [Path(pack) for pack in cfg.merge]
        check_directory_target(target, is_pack, "memory pack", cfg.force, keep=sources)
        with progress_bar(0, "merging", unit="doc") as bar:
            manifest = merge_packs(sources, target, on_document=lambda _: bar.update())
        print(f"merged {len(manifest.documents)} documents into {target}: {manifest.entries()} entries")
        return {"pack": str(target), "documents": len(manifest.documents), "entries": manifest.entries()}
    if cfg.student is None:
        raise ConfigError("student: required; give student=<path> (an export or .ckpt)")
    check_student_path(cfg.student)
    check_windows(cfg.window, cfg.stride, cfg.batch_size)
    documents, total_size = corpus_documents(cfg)
    rows = None if cfg.dataset.path is None else open_dataset(cfg)
    keep = [Path(cfg.student), *(Path(path) for path in cfg.corpus)]
    check_directory_target(target, is_pack, "memory pack", cfg.force, keep, force_hint="force=true")
    student, tokenizer = load_student(cfg.student)
    if tokenizer is None:
        raise ConfigError(f"student: {cfg.student} has no tokenizer to read the corpus with")
    manifest = open_pack(
        target, pack_manifest(student, str(cfg.student), cfg.window, cfg.stride), cfg.force, keep
    )
    start, done, given = time.perf_counter(), 0, 0
    with progress_bar(total_size // 4 if rows is None else None, "memorising") as bar:

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            """Each document's name and token ids ``(L,)``, read and tokenised only when it is its turn."""
            nonlocal done, given
            streamed = () if rows is None else dataset_documents(rows, cfg)
            for name, document in itertools.chain(documents, streamed):
                text = read_text_file(document) if isinstance(document, Path) else document
                given += 1
                yield name, torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
                done += characters(document)
                if rows is None:  # a streamed dataset's size is not known ahead
                    bar.total = max(bar.n, round(bar.n / done * total_size))  # tokens expected in all

        manifest, read = memorize(student, stream(), target, manifest, cfg.batch_size, bar.update)
    if not given:
        raise ConfigError("dataset: every row is blank or excluded; nothing was memorised")
    seconds = time.perf_counter() - start
    tokens = sum(document.tokens for document in manifest.documents[len(manifest.documents) - read :])
    summary = {
        "pack": str(target),
        "documents": len(manifest.documents),
        "read": read,
        "skipped": given - read,
        "entries": manifest.entries(),
        "tokens_per_second": tokens / seconds if read else None,
    }
    print(
        f"memorised {read} documents ({summary['skipped']} already in the pack) into {target}: "
        f"{summary['entries']} entries per layer, {tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="memorize")
def main(cfg: DictConfig) -> None:
    run_hydra_task(run_memorize, cfg, "dmt.memorize", "dmt-memorize")


if __name__ == "__main__":
    main()
