"""TextDataModule: document-level split, packed blocks, batches and early errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from dmt.data import datamodule as dm_module
from dmt.data.datamodule import TextDataModule, pack_blocks, split_documents

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
    ],
)
def test_bad_arguments(gpt2_tokenizer, text_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(gpt2_tokenizer, paths=str(text_dir), **kwargs)


def test_needs_exactly_one_source(gpt2_tokenizer, text_dir):
    with pytest.raises(ValueError, match=r"paths or data\.hub_dataset"):
        TextDataModule(gpt2_tokenizer)
    with pytest.raises(ValueError, match=r"paths or data\.hub_dataset"):
        TextDataModule(gpt2_tokenizer, paths=str(text_dir), hub_dataset="wikitext")


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
