"""TextDataModule: document-level split, packed blocks, batches, named sources and early errors."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import dmt.config  # noqa: F401  (resolvers)
from dmt.conf import CONF_DIR
from dmt.data import corpus as corpus_module
from dmt.data import datamodule as dm_module
from dmt.data.corpus import SOURCES, Source, unwrap_paragraphs
from dmt.data.datamodule import TextDataModule, pack_blocks, split_documents, stream_order

BLOCK = 64


def make(tokenizer, paths, **kwargs) -> TextDataModule:
    kwargs.setdefault("block_size", BLOCK)
    kwargs.setdefault("batch_size", 4)
    module = TextDataModule(tokenizer, paths=paths, **kwargs)
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def data(gpt2_tokenizer, text_dir) -> TextDataModule:
    return make(gpt2_tokenizer, [str(text_dir)], val_fraction=0.34)


def test_pack_blocks_appends_eos_and_drops_remainder():
    assert pack_blocks([[1, 2, 3], [4], [5]], block_size=3, eos_id=0) == [[1, 2, 3], [0, 4, 0]]
    assert pack_blocks([[1, 2]], block_size=4, eos_id=0) == []


def test_split_documents_is_seeded_disjoint_and_covers_everything():
    train, val = split_documents(10, 0.3, seed=1)
    assert len(val) == 3
    assert sorted(train + val) == list(range(10))
    assert split_documents(10, 0.3, seed=1) == (train, val)
    assert split_documents(3, 0.01, seed=0)[1] and split_documents(3, 0.99, seed=0)[0]


def test_batches_are_packed_blocks(data, gpt2_tokenizer):
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (4, BLOCK)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert bool(batch["attention_mask"].all())
    val_batch = next(iter(data.val_dataloader()))
    assert val_batch["input_ids"].shape == (4, BLOCK)
    # Every block is a window of the EOS-separated token stream of its split.
    texts = data.val_texts()
    stream = pack_blocks(
        [gpt2_tokenizer(text)["input_ids"] for text in texts], BLOCK, gpt2_tokenizer.eos_token_id
    )
    assert val_batch["input_ids"].tolist() == stream[:4]


def test_validation_documents_are_not_in_train(data, text_dir):
    train, val = set(data.train_documents), set(data.val_documents)
    assert train and val and not train & val
    assert train | val == {str(path) for path in text_dir.glob("*.txt")}
    assert len(val) == 2
    # No validation text appears in a training block either.
    train_ids = {tuple(row) for row in data.train_dataset[:]["input_ids"].tolist()}
    val_ids = {tuple(row) for row in data.val_dataset[:]["input_ids"].tolist()}
    assert not train_ids & val_ids
    assert data.val_texts() == [Path(name).read_text(encoding="utf-8") for name in data.val_documents]


def test_deterministic_for_a_seed(gpt2_tokenizer, text_dir, data):
    again = make(gpt2_tokenizer, [str(text_dir)], val_fraction=0.34)
    assert again.val_documents == data.val_documents
    first = next(iter(data.train_dataloader()))["input_ids"]
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], first)
    other = TextDataModule(gpt2_tokenizer, paths=str(text_dir), val_fraction=0.34, seed=3)
    assert other.val_documents != data.val_documents


def test_max_blocks_cap(gpt2_tokenizer, text_dir):
    capped = make(gpt2_tokenizer, text_dir, max_train_blocks=10, max_val_blocks=3, eval_batch_size=2)
    assert len(capped.train_dataset) == 10
    assert len(capped.val_dataset) == 3
    assert [len(batch["input_ids"]) for batch in capped.val_dataloader()] == [2, 1]


def test_stream_order_interleaves_contiguous_runs():
    assert stream_order(6, 2) == [0, 3, 1, 4, 2, 5]
    assert stream_order(7, 3) == [0, 2, 4, 1, 3, 5]  # the remainder block is dropped
    assert stream_order(4, 1) == [0, 1, 2, 3]


def test_streams_continue_row_by_row_across_batches(gpt2_tokenizer, text_dir):
    streams = make(gpt2_tokenizer, text_dir, val_fraction=0.34, batch_size=2, train_order="streams")
    batches = [batch["input_ids"] for batch in streams.train_dataloader()]
    # The training documents, in the order the streams read them, packed into one token stream.
    texts = [Path(name).read_text(encoding="utf-8") for name in streams.train_documents]
    stream = pack_blocks([gpt2_tokenizer(t)["input_ids"] for t in texts], BLOCK, gpt2_tokenizer.eos_token_id)
    length = len(stream) // 2
    assert len(batches) == length
    for row in range(2):
        read = [batch[row].tolist() for batch in batches]  # row `row` of every batch, in order
        assert read == stream[row * length : (row + 1) * length]
    # Same documents as the shuffled order, same validation; the reading order is seeded.
    shuffled = make(gpt2_tokenizer, text_dir, val_fraction=0.34, batch_size=2)
    assert sorted(streams.train_documents) == sorted(shuffled.train_documents)
    assert streams.val_documents == shuffled.val_documents
    again = make(gpt2_tokenizer, text_dir, val_fraction=0.34, batch_size=2, train_order="streams")
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], batches[0])


def test_streams_take_the_first_blocks_and_refuse_too_few(gpt2_tokenizer, text_dir):
    capped = make(gpt2_tokenizer, text_dir, batch_size=2, train_order="streams", max_train_blocks=7)
    assert len(capped.train_dataset) == 6  # 2 streams of 3; the 7th block is dropped
    with pytest.raises(ValueError, match="cannot fill 8 streams"):
        make(gpt2_tokenizer, text_dir, batch_size=8, train_order="streams", max_train_blocks=5)
    capped.trainer = SimpleNamespace(world_size=2)  # a DDP run's sampler would split the streams
    with pytest.raises(ValueError, match="train_order=streams runs in one process"):
        capped.train_dataloader()


def test_missing_path_is_named(gpt2_tokenizer, text_dir):
    missing = text_dir / "no_such_play.txt"
    with pytest.raises(FileNotFoundError, match=r"no_such_play\.txt"):
        TextDataModule(gpt2_tokenizer, paths=[str(text_dir), str(missing)])


def test_folder_without_matching_files(gpt2_tokenizer, text_dir):
    with pytest.raises(FileNotFoundError, match=r"'\*\.md'.*texts"):
        TextDataModule(gpt2_tokenizer, paths=str(text_dir), glob="*.md")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 1}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"max_train_blocks": 0}, "max_train_blocks"),
        ({"train_order": "sequential"}, r"data\.train_order: must be one of"),
    ],
)
def test_bad_arguments(gpt2_tokenizer, text_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(gpt2_tokenizer, paths=str(text_dir), **kwargs)


def test_needs_exactly_one_source(gpt2_tokenizer, text_dir):
    message = r"data\.paths, data\.hub_dataset or data\.sources"
    with pytest.raises(ValueError, match=message):
        TextDataModule(gpt2_tokenizer)
    with pytest.raises(ValueError, match=message):
        TextDataModule(gpt2_tokenizer, paths=str(text_dir), hub_dataset="wikitext")
    with pytest.raises(ValueError, match=message):
        TextDataModule(gpt2_tokenizer, paths=str(text_dir), sources={"war_and_peace": "train"})


def test_single_document(gpt2_tokenizer, text_dir):
    module = TextDataModule(gpt2_tokenizer, paths=str(next(text_dir.glob("*.txt"))))
    with pytest.raises(ValueError, match="at least 2 documents"):
        module.setup("fit")


def test_split_too_short_for_a_block(gpt2_tokenizer, tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text("A few words only.")
    with pytest.raises(ValueError, match=r"(train|validation) split.*smaller block_size"):
        make(gpt2_tokenizer, str(tmp_path))


def test_non_utf8_file_is_read_with_replacement(gpt2_tokenizer, tmp_path):
    for name in "ab":
        (tmp_path / f"{name}.txt").write_bytes(b"caf\xe9 au lait, " * 50)  # Latin-1, not UTF-8
    module = make(gpt2_tokenizer, str(tmp_path), block_size=8)
    assert len(module.train_dataset) and len(module.val_dataset)
    assert "caf\ufffd au lait" in module.val_texts()[0]


def test_hub_rows_are_documents(gpt2_tokenizer, monkeypatch):
    rows = Dataset.from_dict({"content": [f"Row {i}. " + "All the world's a stage. " * 20 for i in range(5)]})
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return rows

    monkeypatch.setattr(dm_module, "load_dataset", fake_load_dataset)
    module = TextDataModule(
        gpt2_tokenizer, hub_dataset="user/plays", hub_split="test", text_column="content", batch_size=2
    )
    module.prepare_data()
    module.setup("fit")
    assert calls[0] == ("user/plays", None, "test")
    assert len(module.train_documents) == 4
    assert module.val_documents[0].startswith("test[")
    assert module.val_texts()[0].startswith("Row ")
    assert next(iter(module.train_dataloader()))["input_ids"].shape == (2, 128)

    wrong = TextDataModule(gpt2_tokenizer, hub_dataset="user/plays", text_column="text")
    with pytest.raises(ValueError, match="no column 'text'"):
        wrong.prepare_data()


# -- named sources (the broad corpus) -----------------------------------------------------------------------


def _roman(number: int) -> str:
    return ["I", "II", "III", "IV", "V", "VI", "VII", "VIII"][number - 1]


def _chapters(topic: str, count: int) -> str:
    """Hard-wrapped chapters about ``topic``, each long enough for several 16-token blocks."""
    return "".join(
        f"CHAPTER {_roman(i)}\n\n" + f"In chapter {i} the {topic} went on,\nline after line.\n" * 12
        for i in range(1, count + 1)
    )


@pytest.fixture
def fake_sources(tmp_path, monkeypatch) -> dict[str, str]:
    """Two books of one Gutenberg file and a folder of news articles, as an installed package would ship."""
    root = tmp_path / "fakecorpus"
    (root / "news").mkdir(parents=True)
    books = "".join(
        f"*** START OF THE PROJECT GUTENBERG EBOOK, {title} ***\nTitle page\n{_chapters(topic, 6)}"
        f"*** END OF THE PROJECT GUTENBERG EBOOK, {title} ***\nLicence.\n"
        for title, topic in (("A NOVEL", "story"), ("A HISTORY", "state"))  # (topics of one length)
    )
    (root / "books.txt").write_text(books)
    for i in range(6):
        (root / "news" / f"{i:03d}.txt").write_text(f"Newsroom report {i}\n\n" + "Markets rose. " * 40)
    real_package_path = corpus_module.package_path
    monkeypatch.setattr(
        corpus_module,
        "package_path",
        lambda package: str(root) if package == "fakecorpus" else real_package_path(package),
    )
    common = {"package": "fakecorpus", "licence": "test", "distribution": "test"}
    chapters = {"path": "books.txt", "chapter": r"CHAPTER [IVX]+", "unwrap": True}
    fakes = {
        "fake_novel": Source(book="A NOVEL", domain="novel", **chapters, **common),
        "fake_history": Source(book="A HISTORY", domain="history", **chapters, **common),
        "fake_news": Source(path="news", glob="*.txt", domain="news", **common),
    }
    for name, source in fakes.items():
        monkeypatch.setitem(SOURCES, name, source)
    return {"fake_novel": "train", "fake_history": "train", "fake_news": "heldout"}


def test_sources_split_per_source_and_keep_held_out_sources_apart(gpt2_tokenizer, fake_sources):
    module = make(gpt2_tokenizer, None, sources=fake_sources, block_size=16, val_fraction=0.2)
    train, val = module.train_documents, module.val_documents
    assert not set(train) & set(val)
    assert sorted(train + val) == [
        f"fake_{book}/{i:03d}" for book in ("history", "novel") for i in range(1, 7)
    ]
    for book in ("fake_novel", "fake_history"):
        assert sum(name.startswith(book) for name in val) == 1  # round(0.2 * 6) per source
    assert module.heldout_documents == {"fake_news": [f"fake_news/{i:03d}" for i in range(6)]}
    heldout = module.heldout_texts()
    assert list(heldout) == ["fake_news"] and heldout["fake_news"][2].startswith("Newsroom report 2")
    # Held-out text is in no training or validation block, and the books were unwrapped.
    for dataset in (module.train_dataset, module.val_dataset):
        text = gpt2_tokenizer.decode([t for row in dataset[:]["input_ids"].tolist() for t in row])
        assert "Newsroom" not in text and "Markets" not in text
        assert "went on, line after line." in text and "Licence" not in text


def test_source_budgets(gpt2_tokenizer, fake_sources):
    chapter = len(unwrap_paragraphs(_chapters("story", 1)))
    module = TextDataModule(
        gpt2_tokenizer,
        sources=fake_sources,
        max_source_chars=3 * chapter + 6,
        heldout_chars=250,
        heldout_document_chars=100,
    )
    # Three chapters of each book: the headings' lengths differ, so a fourth never fits.
    assert len(module.train_documents + module.val_documents) == 6
    texts = module.heldout_texts()["fake_news"]
    assert len(texts) == 2 and all(len(text) <= 100 for text in texts)


def test_bad_sources_fail_at_construction(gpt2_tokenizer, fake_sources, monkeypatch):
    with pytest.raises(ValueError, match=r"data\.sources\.fake_poems: unknown source"):
        TextDataModule(gpt2_tokenizer, sources={**fake_sources, "fake_poems": "train"})
    with pytest.raises(ValueError, match=r"data\.sources\.fake_news: role must be"):
        TextDataModule(gpt2_tokenizer, sources={**fake_sources, "fake_news": "eval"})
    ghost = Source(
        package="no_such_data_package", path="x", glob="*", domain="", licence="", distribution="x==1"
    )
    monkeypatch.setitem(SOURCES, "ghost", ghost)
    with pytest.raises(
        FileNotFoundError, match=r"data\.sources\.ghost: .*'no_such_data_package'.*make setup"
    ):
        TextDataModule(gpt2_tokenizer, sources={**fake_sources, "ghost": "heldout"})
    one_chapter = len(unwrap_paragraphs(_chapters("story", 1)))
    with pytest.raises(ValueError, match=r"data\.sources\.fake_novel: need at least 2 documents.*got 1"):
        make(gpt2_tokenizer, None, sources={"fake_novel": "train"}, max_source_chars=one_chapter)


def test_file_corpora_have_no_held_out_sources(data):
    assert data.heldout_texts() == {} and data.heldout_documents == {}


@pytest.mark.skipif(
    any(find_spec(source.package) is None for source in SOURCES.values()),
    reason="broad-corpus packages not installed; run make setup",
)
def test_broad_config_composes_and_builds(gpt2_tokenizer):
    overrides = [
        "data=broad",
        "data.max_source_chars=120000",
        "data.heldout_chars=20000",
        "data.block_size=64",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=overrides)
    module = instantiate(cfg.data, tokenizer=gpt2_tokenizer, _convert_="all")
    module.setup("fit")
    roles = cfg.data.sources
    trained = {name.split("/")[0] for name in module.train_documents + module.val_documents}
    assert trained == {name for name, role in roles.items() if role == "train"}
    assert set(module.heldout_texts()) == {name for name, role in roles.items() if role == "heldout"}
    assert not set(module.train_documents) & set(module.val_documents)
    assert next(iter(module.train_dataloader()))["input_ids"].shape == (cfg.data.batch_size, 64)
