"""The broad corpus: Gutenberg cutting, chapter splitting, cleaning, subsets, roles, and the real sources."""

from __future__ import annotations

import re
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dmt.conf import CONF_DIR
from dmt.data.corpus import (
    SOURCES,
    Document,
    Source,
    build_corpus,
    check_roles,
    clean,
    gutenberg_book,
    head,
    read_source,
    split_chapters,
    subset,
    unwrap_paragraphs,
)

REPO = Path(__file__).resolve().parents[2]
BROAD = OmegaConf.load(CONF_DIR / "data" / "broad.yaml")

TWO_BOOKS = """The Project Gutenberg EBook of First Book
Header text and legal notes.
*** START OF THE PROJECT GUTENBERG EBOOK, FIRST BOOK ***
Title page
CHAPTER I

It was a dark night.
It rained.
CHAPTER II
It was a bright day.
*** END OF THE PROJECT GUTENBERG EBOOK, FIRST BOOK ***
Licence boilerplate.
*** START OF THIS PROJECT GUTENBERG EBOOK SECOND BOOK ***
Second book text.
*** END OF THIS PROJECT GUTENBERG EBOOK SECOND BOOK ***
"""


def test_gutenberg_book_cuts_one_book_between_its_markers():
    first = gutenberg_book(TWO_BOOKS, "FIRST BOOK")
    assert first.strip().startswith("Title page") and first.strip().endswith("It was a bright day.")
    assert "Header" not in first and "Licence" not in first and "Second" not in first
    assert gutenberg_book(TWO_BOOKS, "SECOND BOOK").strip() == "Second book text."
    with pytest.raises(ValueError, match="'THIRD BOOK'"):
        gutenberg_book(TWO_BOOKS, "THIRD BOOK")


def test_split_chapters_drops_front_and_back_matter():
    text = "Contents\nCHAPTER I  (in a table)\n\nCHAPTER I\nOne.\nCHAPTER II\n\nCHAPTER III\nThree.\n"
    assert split_chapters(text, r"CHAPTER [IVX]+") == ["CHAPTER I\nOne.", "CHAPTER III\nThree."]
    with_index = text + "INDEX\nAbscess, 12\n"
    assert split_chapters(with_index, r"CHAPTER [IVX]+", end="INDEX")[-1] == "CHAPTER III\nThree."
    with pytest.raises(ValueError, match="no chapter heading"):
        split_chapters("no headings here", r"CHAPTER [IVX]+")


def test_unwrap_paragraphs_joins_wrapped_lines_and_drops_emphasis_markers():
    text = "It was _very_ dark,\n  and the =Rain= fell\non #London#.\n\n\nNext paragraph\nhere.\n"
    assert unwrap_paragraphs(text) == "It was very dark, and the Rain fell on London.\n\nNext paragraph here."


def test_clean_drops_editorial_spans_before_unwrapping():
    source = Source(
        package="p",
        path="f",
        glob="*",
        drop=r"\[Illustration[^\]]*\]",
        unwrap=True,
        domain="",
        licence="",
        distribution="",
    )
    text = "Before.\r\n\r\n[Illustration: A MAP\r\nOF THE WORLD]\r\n\r\nAfter the\r\nmap."
    assert clean(text, source) == "Before.\n\nAfter the map."
    speech = replace(source, drop=r"\[Applause\]", unwrap=False)
    assert clean("  [Applause] Thank you.\nGod bless. ", speech) == "Thank you.\nGod bless."


def test_source_needs_one_kind_of_layout():
    with pytest.raises(ValueError, match="exactly one of glob and book"):
        Source(package="p", path="f", domain="", licence="", distribution="")
    with pytest.raises(ValueError, match="chapter heading"):
        Source(package="p", path="f", book="B", domain="", licence="", distribution="")


def test_read_source_from_files_and_from_a_book(tmp_path):
    folder = tmp_path / "news"
    (folder / "tech").mkdir(parents=True)
    (folder / "tech" / "001.txt").write_text("Title one\n\nBody one.", encoding="utf-8")
    (folder / "tech" / "002.txt").write_bytes("Costs \u00a35 a month".encode("latin-1"))  # not UTF-8
    news = Source(package="p", path="news", glob="*/*.txt", domain="news", licence="", distribution="")
    assert read_source("news", news, root=folder) == [
        Document("news/tech/001", "Title one\n\nBody one."),
        Document("news/tech/002", "Costs \u00a35 a month"),
    ]
    (tmp_path / "big.txt").write_text(TWO_BOOKS)
    book = Source(
        package="p",
        path="big.txt",
        book="FIRST BOOK",
        chapter=r"CHAPTER [IVX]+",
        unwrap=True,
        domain="",
        licence="",
        distribution="",
    )
    assert read_source("book", book, root=tmp_path / "big.txt") == [
        Document("book/001", "CHAPTER I\n\nIt was a dark night. It rained."),
        Document("book/002", "CHAPTER II It was a bright day."),  # (no blank line after this heading)
    ]
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.news: no file matching '\*\.md'"):
        read_source("news", replace(news, glob="*.md"), root=folder)


def test_subset_is_fixed_whole_documents_in_order_within_budget():
    documents = [Document(f"s/{i}", "x" * (10 + i)) for i in range(20)]
    kept = subset(documents, 100)
    assert kept == subset(documents, 100)  # the same corpus on every run
    assert 90 <= sum(len(d.text) for d in kept) <= 100 and len(kept) >= 4
    assert kept == sorted(kept, key=documents.index)
    assert [d.name for d in kept] != [d.name for d in documents[: len(kept)]]  # spread, not a prefix
    assert subset(documents, None) == documents
    assert subset(documents, 5) == []


def test_head_cuts_at_a_line_break_near_the_limit():
    text = "First line here.\nSecond line here.\nThird."
    assert head(text, None) == head(text, 100) == text
    assert head(text, 36) == "First line here.\nSecond line here."
    assert head("no breaks at all in this text", 9) == "no breaks"


def test_check_roles_names_the_bad_source():
    with pytest.raises(ValueError, match=r"data\.sources\.poems: unknown source"):
        check_roles({"war_and_peace": "train", "poems": "train"})
    with pytest.raises(ValueError, match=r"data\.sources\.sotu: role must be one of"):
        check_roles({"war_and_peace": "train", "sotu": "test"})
    with pytest.raises(ValueError, match="no source has role 'train'"):
        check_roles({"sotu": "heldout"})


def test_every_source_is_documented_and_pinned_in_the_makefile():
    assets = re.search(r"^ASSETS := (.*?)\n\n", (REPO / "Makefile").read_text(), re.MULTILINE | re.DOTALL)
    assert assets is not None
    pinned = set(assets.group(1).replace("\\", " ").split())
    for name, source in SOURCES.items():
        assert source.domain and source.licence, name
        assert source.distribution.split()[0] in pinned, (name, source.distribution)


def test_broad_config_holds_out_whole_sources_of_different_domains():
    roles = OmegaConf.to_container(BROAD.sources)
    check_roles(roles)
    heldout = [name for name, role in roles.items() if role == "heldout"]
    assert len(heldout) >= 3  # two sources plus the Shakespeare column
    assert len({SOURCES[name].domain for name in heldout}) == len(heldout)
    trained_domains = {SOURCES[name].domain for name, role in roles.items() if role == "train"}
    assert len(trained_domains | {SOURCES[name].domain for name in heldout}) >= 6


# -- the real corpus (installed by `make setup`) ----------------------------------------------------------

MISSING = sorted({source.package for source in SOURCES.values() if find_spec(source.package) is None})
needs_corpus = pytest.mark.skipif(
    bool(MISSING), reason=f"broad-corpus packages not installed ({', '.join(MISSING)}); run make setup"
)

# Documents and characters of each whole source (measured; ranges allow for a different package build).
EXPECTED = {
    "war_and_peace": (365, 3_100_000, 3_300_000),
    "us_history": (24, 1_100_000, 1_250_000),
    "surgery": (21, 1_050_000, 1_200_000),
    "sherlock_holmes": (12, 520_000, 600_000),
    "sotu": (249, 11_500_000, 13_000_000),
    "bbc_news": (2225, 4_800_000, 5_300_000),
    "shakespeare": (42, 4_800_000, 5_300_000),
}


@needs_corpus
def test_real_sources_have_the_expected_documents_and_no_boilerplate():
    assert set(EXPECTED) == set(SOURCES)
    for name, (count, low, high) in EXPECTED.items():
        documents = read_source(name)
        chars = sum(len(d.text) for d in documents)
        assert len(documents) == count and low <= chars <= high, (name, len(documents), chars)
        assert len({d.name for d in documents}) == count
        for document in documents:
            assert not re.search(r"project gutenberg|\[illustration|\[applause", document.text, re.I), (
                document.name
            )


@needs_corpus
def test_real_broad_corpus_keeps_held_out_sources_whole_and_apart():
    roles = OmegaConf.to_container(BROAD.sources)
    corpus = build_corpus(roles, BROAD.max_source_chars, BROAD.heldout_chars, BROAD.heldout_document_chars)
    assert set(corpus.train) == {"war_and_peace", "us_history", "surgery", "sotu"}
    assert set(corpus.heldout) == {"sherlock_holmes", "bbc_news", "shakespeare"}
    for name, documents in corpus.train.items():
        assert (
            0.5 * BROAD.max_source_chars <= sum(len(d.text) for d in documents) <= BROAD.max_source_chars
        ), name
    for name, documents in corpus.heldout.items():
        assert 0.8 * BROAD.heldout_chars <= sum(len(d.text) for d in documents) <= BROAD.heldout_chars, name
        assert all(len(d.text) <= BROAD.heldout_document_chars for d in documents), name
    assert len(corpus.heldout["sherlock_holmes"]) == 12  # the start of every story
    assert len(corpus.heldout["bbc_news"]) >= 30
    train_text = "\n".join(d.text for documents in corpus.train.values() for d in documents)
    for documents in corpus.heldout.values():
        assert not any(d.text[:2000] in train_text for d in documents)
