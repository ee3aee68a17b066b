"""Plain-text corpora as packed causal-LM blocks for Lightning.

A corpus is a list of *documents*: each local text file is one document, and so is each row of a Hugging
Face hub dataset and each document of a named source of the broad corpus (:mod:`dmt.data.corpus`).
Documents are split into train and validation *by document* (never one document in both), so validation
perplexity measures generalisation to unseen text rather than to unseen offsets of seen text. Named
sources are split per source, and those with role ``heldout`` are in neither split: they are kept whole
for evaluation (:meth:`TextDataModule.heldout_texts`).

Each split is tokenised with ``datasets.Dataset.map``, every document is followed by the tokenizer's EOS
token, and the token stream is cut into contiguous blocks of ``block_size`` tokens. Training batches are
shuffled blocks (``train_order: shuffled``) or *streams* (``train_order: streams``): the training documents
in a seeded order, cut into ``batch_size`` contiguous streams, so that row ``b`` of each batch continues row
``b`` of the batch before it. A memory that inserts as it trains then holds what its documents said a few
windows back, as it will when it reads a long document (:mod:`dmt.evaluation.long_document`).

Local files are read with :func:`dmt.files.read_text_file`: a stray non-UTF-8 byte becomes U+FFFD instead
of aborting a long run, while an empty file or one that is not text is refused, naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from dmt.data.corpus import SOURCES, Document, build_corpus, check_roles, source_root
from dmt.errors import ConfigError
from dmt.files import read_text_file

TRAIN_ORDERS = ("shuffled", "streams")

# Documents per ``Dataset.map`` batch. Packing runs per batch (as in Hugging Face's ``run_clm``), so each
# batch drops at most ``block_size - 1`` tokens, while memory stays bounded for large hub datasets.
PACK_DOCUMENTS = 1000


def pack_blocks(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int) -> list[list[int]]:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into full blocks.

    Args:
        token_lists: token ids of each document, without EOS
        block_size: tokens per block
        eos_id: separator appended after every document
    Returns:
        ``(N, block_size)`` as nested lists; the trailing partial block is dropped.
    """
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    usable = len(stream) - len(stream) % block_size
    return [stream[start : start + block_size] for start in range(0, usable, block_size)]


def split_documents(n_documents: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of document indices into (train, validation), each non-empty and sorted.

    The validation split gets ``round(val_fraction * n)`` documents, clamped to ``[1, n - 1]``.
    """
    if n_documents < 2:
        raise ValueError(
            f"need at least 2 documents to split train/validation by document, got {n_documents}; "
            "add files or rows"
        )
    n_val = min(n_documents - 1, max(1, round(val_fraction * n_documents)))
    order = torch.randperm(n_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def resolve_files(paths: Sequence[str | os.PathLike[str]], glob: str) -> list[Path]:
    """Text files named by ``paths``: files as given, folders expanded with ``glob`` (sorted, non-recursive).

    Raises ``FileNotFoundError`` for a missing path or a folder with no file matching ``glob``.
    """
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.glob(glob) if p.is_file())
            if not matches:
                raise FileNotFoundError(f"no file matching {glob!r} in folder {path}")
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"data path not found: {path}")
    # A file listed both directly and through its folder is still one document.
    return list(dict.fromkeys(files))


def stream_order(n_blocks: int, streams: int) -> list[int]:
    """Block indices that make consecutive batches of ``streams`` rows read ``streams`` contiguous streams.

    Blocks ``0 .. n_blocks - 1`` are cut into ``streams`` runs of ``n_blocks // streams`` (the remainder is
    dropped); batch ``i`` is ``[run_0[i], run_1[i], ...]``. E.g. ``stream_order(6, 2) == [0, 3, 1, 4, 2, 5]``.
    """
    length = n_blocks // streams
    return [stream * length + step for step in range(length) for stream in range(streams)]


def collate_blocks(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks into a causal-LM batch.

    Returns ``input_ids`` and ``attention_mask``, both ``(B, T)`` int64; the mask is all ones because
    packed blocks contain no padding.
    """
    input_ids = torch.stack([row["input_ids"] for row in rows])  # (B, T)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _tokenise_and_pack(
    batch: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, block_size: int, eos_id: int
) -> dict[str, list[list[int]]]:
    """``Dataset.map`` function: a batch of documents → a (usually different) number of blocks."""
    token_lists = tokenizer(batch["text"], return_attention_mask=False)["input_ids"]
    return {"input_ids": pack_blocks(token_lists, block_size, eos_id)}


class TextDataModule(pl.LightningDataModule):
    """Train/validation blocks from local text files, a hub dataset or named sources, split by document.

    Batches are ``{"input_ids": (B, T), "attention_mask": (B, T)}`` int64 tensors with ``T = block_size``;
    Hugging Face causal LMs shift labels internally, so callers pass ``labels=input_ids``.

    Args:
        tokenizer: Hugging Face tokenizer with an EOS token
        paths: text files and/or folders (exclusive with ``hub_dataset`` and ``sources``)
        glob: pattern for files inside folders (non-recursive)
        hub_dataset, hub_config, hub_split: ``load_dataset(hub_dataset, hub_config, split=hub_split)``
        text_column: hub dataset column holding the text
        sources: source name (of :data:`dmt.data.corpus.SOURCES`) → role, ``train`` or ``heldout``
        max_source_chars: per training source, a fixed subset of whole documents of at most this many
            characters, so that no source dominates; null: all
        heldout_chars, heldout_document_chars: per held-out source, the first ``heldout_document_chars``
            of each document, and a fixed subset of these of at most ``heldout_chars`` in all; null: all
        block_size: tokens per block
        batch_size: training batch size
        eval_batch_size: validation batch size (defaults to ``batch_size``)
        val_fraction: share of documents held out for validation, in (0, 1)
        max_train_blocks, max_val_blocks: keep a seeded random subset of at most this many blocks (with
            ``train_order: streams``, the training stream's first blocks)
        train_order: ``shuffled`` blocks, or ``streams`` (module docstring); streams need one process
        num_workers: ``DataLoader`` workers
        seed: seeds the document split, the block subsets and the training shuffle
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        glob: str = "*.txt",
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        hub_split: str = "train",
        text_column: str = "text",
        sources: Mapping[str, str] | None = None,
        max_source_chars: int | None = None,
        heldout_chars: int | None = None,
        heldout_document_chars: int | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        train_order: str = "shuffled",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # The tokenizer is an object, not a hyperparameter; the teacher config already records it.
        self.save_hyperparameters(ignore=["tokenizer"])
        if sum(option is not None for option in (paths, hub_dataset, sources)) != 1:
            raise ConfigError("data: give exactly one of data.paths, data.hub_dataset or data.sources")
        if block_size < 2:
            raise ConfigError(
                f"data.block_size: must be >= 2 (a causal LM needs a next token), got {block_size}"
            )
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size: must be >= 1, got {eval_batch_size}")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must lie in (0, 1), got {val_fraction}")
        if train_order not in TRAIN_ORDERS:
            raise ConfigError(f"data.train_order: must be one of {TRAIN_ORDERS}, got {train_order!r}")
        caps = {
            "max_train_blocks": max_train_blocks,
            "max_val_blocks": max_val_blocks,
            "max_source_chars": max_source_chars,
            "heldout_chars": heldout_chars,
            "heldout_document_chars": heldout_document_chars,
        }
        for name, cap in caps.items():
            if cap is not None and cap < 1:
                raise ConfigError(f"data.{name}: must be >= 1 or null, got {cap}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to separate documents")
        self.tokenizer = tokenizer
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        # Resolved now so that a typo fails at construction, not after a teacher has been loaded.
        self.files = resolve_files(paths, glob) if paths is not None else []
        if sources is not None:
            check_roles(sources)
            for name in sources:
                source_root(name, SOURCES[name])
        self._corpus: Dataset | None = None  # column "text", one row per document
        self._names: list[str] = []
        self._heldout: dict[str, list[Document]] = {}  # held-out source → its documents
        self._split: tuple[list[int], list[int]] | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    # -- documents ---------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the hub dataset into the Hugging Face cache (rank 0 only, per Lightning)."""
        if self.hparams.hub_dataset is not None:
            self._load_hub()

    def _load_hub(self) -> Dataset:
        hp = self.hparams
        rows = load_dataset(hp.hub_dataset, hp.hub_config, split=hp.hub_split)
        if hp.text_column not in rows.column_names:
            raise ValueError(
                f"hub dataset {hp.hub_dataset!r} has no column {hp.text_column!r} "
                f"(columns: {', '.join(rows.column_names)}); set data.text_column"
            )
        return rows.select_columns([hp.text_column]).rename_column(hp.text_column, "text")

    def _documents(self) -> tuple[Dataset, tuple[list[int], list[int]]]:
        """The corpus and its (train, validation) document indices, loaded once."""
        if self._corpus is None or self._split is None:
            hp = self.hparams
            if hp.sources is not None:
                self._corpus, self._split = self._load_sources()
                return self._corpus, self._split
            if self.files:
                self._names = [str(path) for path in self.files]
                texts = [read_text_file(path) for path in self.files]
                self._corpus = Dataset.from_dict({"text": texts})
            else:
                self._corpus = self._load_hub()
                self._names = [f"{hp.hub_split}[{i}]" for i in range(len(self._corpus))]
            self._split = split_documents(len(self._corpus), hp.val_fraction, hp.seed)
        return self._corpus, self._split

    def _load_sources(self) -> tuple[Dataset, tuple[list[int], list[int]]]:
        """The training sources' documents, split train/validation per source; held-out sources aside."""
        hp = self.hparams
        corpus = build_corpus(hp.sources, hp.max_source_chars, hp.heldout_chars, hp.heldout_document_chars)
        texts: list[str] = []
        train: list[int] = []
        val: list[int] = []
        for name, documents in corpus.train.items():
            try:
                source_train, source_val = split_documents(len(documents), hp.val_fraction, hp.seed)
            except ValueError as err:
                raise ValueError(f"data.sources.{name}: {err}") from None
            train += [len(texts) + i for i in source_train]
            val += [len(texts) + i for i in source_val]
            texts += [document.text for document in documents]
            self._names += [document.name for document in documents]
        self._heldout = corpus.heldout
        return Dataset.from_dict({"text": texts}), (train, val)

    def _train_indices(self) -> list[int]:
        """The training documents' corpus rows in the order training reads them."""
        train = self._documents()[1][0]
        if self.hparams.train_order != "streams":
            return train
        # A seeded order, so that each stream mixes sources, each document read from its start.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.seed))
        return [train[i] for i in order.tolist()]

    @property
    def train_documents(self) -> list[str]:
        """Names of the training documents (file paths, ``split[row]`` (hub) or ``source/unit`` (sources)),
        in the order that ``train_order: streams`` reads them."""
        return [self._names[i] for i in self._train_indices()]

    @property
    def val_documents(self) -> list[str]:
        """Names of the validation documents: file paths, ``split[row]`` (hub), ``source/unit`` (sources)."""
        _, val = self._documents()[1]
        return [self._names[i] for i in val]

    def val_texts(self) -> list[str]:
        """Raw text of the validation documents, for document-level evaluation such as perplexity."""
        corpus, (_, val) = self._documents()
        return list(corpus.select(val, keep_in_memory=True)["text"])

    def heldout_texts(self) -> dict[str, list[str]]:
        """Text of the held-out sources' documents, by source (``data.sources`` role ``heldout``).

        Never in the training or validation split: evaluation reports one perplexity per source. Empty
        for file and hub corpora, which have no held-out sources.
        """
        self._documents()
        return {name: [document.text for document in documents] for name, documents in self._heldout.items()}

    @property
    def heldout_documents(self) -> dict[str, list[str]]:
        """Names (``source/unit``) of the held-out sources' documents, by source."""
        self._documents()
        return {name: [document.name for document in documents] for name, documents in self._heldout.items()}

    # -- blocks ------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Tokenise and pack both splits once; every stage uses the same blocks."""
        if self.train_dataset is not None:
            return
        corpus, (train, val) = self._documents()
        hp = self.hparams
        if hp.train_order == "streams":
            blocks = self._blocks(corpus.select(self._train_indices(), keep_in_memory=True), "train", None)
            if hp.max_train_blocks is not None:
                blocks = blocks.select(range(min(hp.max_train_blocks, len(blocks))), keep_in_memory=True)
            if len(blocks) < hp.batch_size:
                raise ValueError(
                    f"train_order=streams: {len(blocks)} training blocks cannot fill {hp.batch_size} streams"
                )
            self.train_dataset = blocks.select(stream_order(len(blocks), hp.batch_size), keep_in_memory=True)
        else:
            self.train_dataset = self._blocks(
                corpus.select(train, keep_in_memory=True), "train", hp.max_train_blocks
            )
        self.val_dataset = self._blocks(
            corpus.select(val, keep_in_memory=True), "validation", hp.max_val_blocks
        )

    def _blocks(self, documents: Dataset, split: str, cap: int | None) -> Dataset:
        """Packed ``(N, block_size)`` blocks of one split as a torch-formatted dataset."""
        hp = self.hparams
        # keep_in_memory: the result lives in RAM only, no cache files beside the hub download.
        blocks = documents.map(
            _tokenise_and_pack,
            batched=True,
            batch_size=PACK_DOCUMENTS,
            remove_columns=documents.column_names,
            keep_in_memory=True,
            load_from_cache_file=False,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "block_size": hp.block_size,
                "eos_id": self.tokenizer.eos_token_id,
            },
            desc=f"tokenising {split}",
        )
        if len(blocks) == 0:
            raise ValueError(
                f"the {split} split ({len(documents)} documents) yields no block of "
                f"block_size={hp.block_size} tokens; use a smaller block_size or more text"
            )
        if cap is not None and len(blocks) > cap:
            # A random subset rather than the first blocks, so a capped run still sees every document.
            blocks = blocks.shuffle(seed=hp.seed, keep_in_memory=True).select(range(cap), keep_in_memory=True)
        return blocks.with_format("torch")

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.hparams.seed) if shuffle else None,
            collate_fn=collate_blocks,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        streams = self.hparams.train_order == "streams"
        if streams and self.trainer is not None and self.trainer.world_size > 1:
            # A distributed sampler would deal each stream's blocks out over the ranks.
            raise ValueError("data.train_order=streams runs in one process; use shuffled with DDP")
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=not streams)

    def val_dataloader(self) -> DataLoader:
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(self.val_dataset, batch_size, shuffle=False)
