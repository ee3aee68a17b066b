"""``python -m dmt.inspect``: what a student's memory holds, entry by entry.

For each memory layer of an export directory or a ``.ckpt`` (anything :func:`load_student` reads) it lists
the live entries with

- their use: the LRFU score (the store's CRF at its current clock) and the read count (references since the
  entry was stored), and the clock at which the entry was stored;
- their origin: ``unit u`` for an entry seeded from unit ``u`` of the replaced MLP (``init: ffn``), else the
  text span that ended at the token which inserted it (decoded with the tokenizer when the student has
  one, else its token ids), and the token that followed it (what ``next_token_weight`` mixes; ``-`` when
  unknown: a seeded entry, or one saved before stores kept it);
- what each promotes, by a logit lens: the tokens whose logits the entry's value raises most. An entry read
  by head ``h`` adds ``W_h · value`` to the residual stream (``W_h``: the columns ``h·Dv:(h+1)·Dv`` of the
  output projection; the projection's bias is the layer's, not the entry's); that vector is projected
  directly through the unembedding, without the final norm, as Geva et al. (2022) project the value
  vectors of feed-forward layers. Heads share the store, so an entry can be read by any head: by default
  the lens uses the mean over heads of ``W_h · value`` (the lens is linear, so this is the mean of the
  per-head lenses); ``--head`` picks one head. A layer without dense projections stores ``d_model``-wide
  values, which are the contribution itself. Only the first ``value_dim`` columns of an entry are its
  value: a gated featural memory stores the gate key after it.

Given a memory pack (``dmt-memorize``) it lists the pack's documents with their tokens and entries; with
``--student`` and ``--texts`` the student reads the texts with the pack in its memory and each document's
row also counts the reads of its entries (how often they were among a query's top-k), which shows the
sources a reading draws on.

It prints one summary line and a table per layer, and ``--json`` writes the same report (the same rows) as
JSON. :func:`entry_use` gives the use of every live entry of a store, for plots (see
``notebooks/analyze_run.ipynb``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dmt.cli import command_name, user_errors
from dmt.data.datamodule import resolve_files
from dmt.errors import ConfigError
from dmt.evaluation.perplexity import check_windows, perplexity
from dmt.files import read_text_file, refuse_existing_file, write_json
from dmt.layers import MemoryLayer
from dmt.memory import KNNStore
from dmt.model.persistence import load_student
from dmt.model.surgery import memory_layers
from dmt.packs.files import PackManifest, is_pack, read_pack

# Row orders: the column each sorts by, largest first except ``slot`` (ties: lower slot first).
SORTS = ("score", "reads", "slot", "inserted")
# Longest origin text shown in the table (the JSON keeps it whole).
ORIGIN_WIDTH = 40
TABLE_HEADER = ("slot", "LRFU score", "reads", "inserted at", "origin", "next", "promotes")


@dataclass
class EntryUse:
    """Use and origin of the ``L`` live entries of a store, by ascending slot."""

    slots: np.ndarray  # (L,) int64
    scores: np.ndarray  # (L,) float64 LRFU score at the store's clock
    reads: np.ndarray  # (L,) int64 references since the entry was stored
    inserted_at: np.ndarray  # (L,) int64 clock when the entry was stored
    origin_units: np.ndarray  # (L,) int32 MLP unit seeded from, -1 for inserted entries
    origin_tokens: np.ndarray  # (L, ORIGIN_SPAN) int32 span ending at the inserting token, -1 padded
    next_tokens: np.ndarray  # (L,) int64 the token that followed the inserting one, -1 unknown

    @property
    def seeded(self) -> np.ndarray:
        """``(L,)`` bool: entries seeded from an MLP unit rather than inserted by a token."""
        return self.origin_units >= 0

    def order(self, sort: str) -> np.ndarray:
        """``(L,)`` positions of the entries in the order ``sort`` (one of :data:`SORTS`) names."""
        column = {
            "score": -self.scores,
            "reads": -self.reads,
            "slot": self.slots,
            "inserted": -self.inserted_at,
        }.get(sort)
        if column is None:
            raise ConfigError(f"--sort: must be one of {', '.join(SORTS)}, got {sort!r}")
        return np.lexsort((self.slots, column))  # last key is primary


def entry_use(store: KNNStore) -> EntryUse:
    """The use and origin of every live entry of ``store`` (nothing in the store changes)."""
    slots = store.live_ids()
    units, tokens = store.origins(slots)
    return EntryUse(
        slots=slots,
        scores=store.lrfu_scores(slots),
        reads=store.read_counts(slots),
        inserted_at=store.insertion_times(slots),
        origin_units=units,
        origin_tokens=tokens,
        next_tokens=store.next_tokens(slots),
    )


def residual_contributions(layer: MemoryLayer, entries: torch.Tensor, head: int | None) -> torch.Tensor:
    """What entries ``(M, E)`` add to the residual stream when read with weight 1 → ``(M, C)``.

    ``W_h · value`` for head ``head``, or its mean over the heads when ``head`` is None; the value itself
    when the layer has no dense output projection.
    """
    values = entries[:, : layer.value_dim]  # (M, Dv): a gated entry's gate key follows its value
    if not layer.cfg.dense:
        return values
    weight = layer.out_proj.weight.detach().float().cpu()  # (C, H·Dv), as the values
    per_head = weight.view(weight.shape[0], layer.heads, layer.value_dim)  # (C, H, Dv)
    if head is None:
        return values @ per_head.mean(dim=1).T  # (M, C)
    return values @ per_head[:, head].T  # (M, C)


def logit_lens(
    unembedding: nn.Module, contributions: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` token ids ``(M, k)`` and their logits ``(M, k)`` of ``contributions (M, C)`` projected
    through ``unembedding`` (the model's output embedding; its bias, if any, is left out as it is no
    entry's)."""
    weight = unembedding.weight.detach().float().cpu()  # (V, C), as the contributions
    logits = contributions @ weight.T  # (M, V)
    top = logits.topk(min(k, logits.shape[1]), dim=1)
    return top.indices, top.values


def decode(tokenizer: Any | None, token_ids: Sequence[int]) -> str | None:
    """The text of ``token_ids``, or None without a tokenizer."""
    return None if tokenizer is None else tokenizer.decode(list(token_ids))


def origin_of(unit: int, tokens: np.ndarray, tokenizer: Any | None) -> dict[str, Any]:
    """JSON-ready origin of an entry from its ``unit`` and ``tokens (ORIGIN_SPAN,)`` (-1 padded)."""
    token_ids = [int(t) for t in tokens if t >= 0]
    return {
        "unit": int(unit) if unit >= 0 else None,
        "token_ids": token_ids,
        "text": decode(tokenizer, token_ids) if token_ids else None,
    }


def next_token_of(token: int, tokenizer: Any | None) -> dict[str, Any] | None:
    """JSON-ready next token of an entry (None: unknown)."""
    return None if token < 0 else {"token_id": token, "token": decode(tokenizer, [token])}


def origin_label(origin: dict[str, Any]) -> str:
    """``unit 123``, the span's text (or its token ids), or ``-`` for an entry without a recorded origin."""
    if origin["unit"] is not None:
        return f"unit {origin['unit']}"
    if origin["text"] is not None:
        return repr(origin["text"])
    return str(origin["token_ids"]) if origin["token_ids"] else "-"


def layer_summary(block: int, layer: MemoryLayer, use: EntryUse) -> dict[str, Any]:
    """Size, index backend, clock, seeded and inserted entries and the share never read, of one layer."""
    entries = len(use.slots)
    return {
        "block": block,
        "type": layer.cfg.type,
        "heads": layer.heads,
        "entries": entries,
        "capacity": layer.store.capacity,
        "backend": layer.store.index_backend,
        "clock": layer.store.now,
        "seeded": int(np.count_nonzero(use.seeded)),
        "inserted": int(np.count_nonzero(~use.seeded)),
        "never_read_share": float(np.mean(use.reads == 0)) if entries else None,
    }


def inspect_layer(
    model: nn.Module,
    block: int,
    layer: MemoryLayer,
    tokenizer: Any | None = None,
    top: int = 20,
    tokens: int = 5,
    sort: str = "score",
    head: int | None = None,
) -> dict[str, Any]:
    """JSON-ready report of one memory layer: :func:`layer_summary` plus ``rows``, its first ``top``
    entries in the order ``sort``, each with its use, origin and the ``tokens`` tokens it promotes most."""
    if head is not None and not 0 <= head < layer.heads:
        raise ConfigError(f"--head {head}: block {block} has {layer.heads} head(s)")
    use = entry_use(layer.store)
    chosen = use.order(sort)[:top]  # (R,)
    _, entries = layer.store.get(use.slots[chosen])  # (R, E)
    contributions = residual_contributions(layer, torch.from_numpy(entries), head)  # (R, C)
    token_ids, logits = logit_lens(model.get_output_embeddings(), contributions, tokens)  # (R, k) each
    rows = []
    for row, position in enumerate(chosen):
        promotes = [
            {"token_id": int(t), "token": decode(tokenizer, [int(t)]), "logit": float(v)}
            for t, v in zip(token_ids[row], logits[row], strict=True)
        ]
        rows.append(
            {
                "slot": int(use.slots[position]),
                "lrfu_score": float(use.scores[position]),
                "read_count": int(use.reads[position]),
                "inserted_at": int(use.inserted_at[position]),
                "origin": origin_of(use.origin_units[position], use.origin_tokens[position], tokenizer),
                "next_token": next_token_of(int(use.next_tokens[position]), tokenizer),
                "promotes": promotes,
            }
        )
    return {**layer_summary(block, layer, use), "rows": rows}


def inspect_model(
    model: nn.Module,
    tokenizer: Any | None = None,
    block: int | None = None,
    top: int = 20,
    tokens: int = 5,
    sort: str = "score",
    head: int | None = None,
) -> dict[str, Any]:
    """JSON-ready report of memory layer ``block`` (default: every memory layer) of ``model``.

    Raises:
        ValueError: ``model`` has no memory layer, or ``block`` is not one (naming those there are).
    """
    layers = memory_layers(model)
    if not layers:
        raise ConfigError("student: the model has no memory layer")
    if block is not None and block not in layers:
        blocks = ", ".join(map(str, layers))
        raise ConfigError(f"--layer {block} is not a memory layer; memory layers are at blocks {blocks}")
    chosen = [block] if block is not None else sorted(layers)
    return {
        "sort": sort,
        "top": top,
        "tokens": tokens,
        "head": "mean" if head is None else head,
        "layers": [inspect_layer(model, i, layers[i], tokenizer, top, tokens, sort, head) for i in chosen],
    }


def summary_line(report: dict[str, Any]) -> str:
    """One line of a layer report's summary."""
    never = report["never_read_share"]
    return (
        f"block {report['block']} {report['type']} ({report['heads']} head(s)): {report['entries']:,} of "
        f"{report['capacity']:,} entries, {report['backend']} index, clock {report['clock']:,}; "
        f"{report['seeded']:,} seeded, {report['inserted']:,} inserted; "
        f"never read: {'-' if never is None else f'{never:.1%}'}"
    )


def table_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A report row as the cells of :data:`TABLE_HEADER`; texts are quoted to show their spaces."""
    origin = origin_label(row["origin"])
    if len(origin) > ORIGIN_WIDTH:
        origin = origin[: ORIGIN_WIDTH - 1] + "…"
    following = row["next_token"]
    next_label = (
        "-"
        if following is None
        else (str(following["token_id"]) if following["token"] is None else repr(following["token"]))
    )
    promoted = (str(p["token_id"]) if p["token"] is None else repr(p["token"]) for p in row["promotes"])
    return (
        str(row["slot"]),
        f"{row['lrfu_score']:.4g}",
        str(row["read_count"]),
        str(row["inserted_at"]),
        origin,
        next_label,
        " ".join(promoted),
    )


def format_table(report: dict[str, Any]) -> str:
    """A layer report's rows as a fixed-width text table (the last column unpadded)."""
    lines = [TABLE_HEADER, *(table_cells(row) for row in report["rows"])]
    widths = [max(len(cells[i]) for cells in lines) for i in range(len(TABLE_HEADER))]
    widths[-1] = 0
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines)


def format_report(report: dict[str, Any]) -> str:
    """Every layer's summary line and table."""
    parts = []
    for layer in report["layers"]:
        parts.append(summary_line(layer))
        parts.append(format_table(layer) if layer["rows"] else "(no entries)")
    return "\n\n".join(parts)


def pack_report(manifest: PackManifest, reads: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """What a memory pack holds: its student, layers and reading, and per document its tokens and entries
    (and, given ``reads``, per layer the reads of each document's entries, :func:`pack_reads`)."""
    documents = []
    for number, d in enumerate(manifest.documents):
        row = {"document": d.name, "tokens": d.tokens, "entries": d.entries}
        if reads is not None:
            row["reads"] = {layer: int(counts[number]) for layer, counts in reads.items()}
        documents.append(row)
    return {
        "student": manifest.student,
        "reading": manifest.reading,
        "entries": manifest.entries(),
        "documents": documents,
    }


def pack_reads(
    student: Path, pack: Path, texts: list[str], window: int, stride: int, index: str | None
) -> tuple[PackManifest, dict[str, np.ndarray], float]:
    """Read ``texts`` with ``student`` holding ``pack`` (:func:`~dmt.packs.use_pack`, on the key index
    ``index``, None: the layers' own): per layer the reads ``(D,)`` of each document's entries, and the
    texts' perplexity. The pack's entries fill each store's first slots in document order, and a
    reading without inserts moves none of them, so a document's entries are a slot range."""
    model, tokenizer = load_student(
        student, memory=pack, memory_index=None if index is None else {"backend": index}
    )
    if tokenizer is None:
        raise ConfigError(f"--student: {student} has no tokenizer to read the texts with")
    manifest = read_pack(pack)
    layers = {key: memory_layers(model)[int(key)] for key in manifest.layers}
    slots = {key: np.arange(manifest.entries()[key]) for key in manifest.layers}
    stored = {key: layer.store.insertion_times(slots[key]) for key, layer in layers.items()}
    result = perplexity(model, tokenizer, texts, window, stride, desc="reading")
    reads = {}
    for key, layer in layers.items():
        if not np.array_equal(layer.store.insertion_times(slots[key]), stored[key]):
            raise ConfigError(
                f"--student: the layer of block {key} inserts while reading (insert_during_eval) and "
                "replaced entries of the pack, so reads cannot be told per document"
            )
        counts = layer.store.read_counts(slots[key])  # (M,)
        bounds = np.cumsum([0, *(d.entries.get(key, 0) for d in manifest.documents)])  # (D + 1,)
        running = np.concatenate([[0], np.cumsum(counts)])  # (M + 1,)
        reads[key] = running[bounds[1:]] - running[bounds[:-1]]
    return manifest, reads, result["perplexity"]


def format_pack_report(report: dict[str, Any]) -> str:
    """One summary line, then one line per document."""
    layers = sorted(report["entries"], key=int)
    student = report["student"]
    head = (
        f"memory pack of student {student['name']} (weights {student['fingerprint'][:12]}), "
        f"window {report['reading']['window']}, stride {report['reading']['stride']}: "
        f"{len(report['documents'])} documents, entries "
        + ", ".join(f"layer {layer}: {report['entries'][layer]:,}" for layer in layers)
    )
    if "perplexity" in report:
        head += f"\nread {report['texts']} texts at perplexity {report['perplexity']:.3f}; reads per layer:"
    counted = "reads" in report["documents"][0] if report["documents"] else False
    rows = [
        (
            "document",
            "tokens",
            *(f"layer {layer}" for layer in layers),
            *((f"reads {layer}" for layer in layers) if counted else ()),
        )
    ]
    rows += [
        (
            d["document"],
            f"{d['tokens']:,}",
            *(f"{d['entries'].get(layer, 0):,}" for layer in layers),
            *((f"{d['reads'].get(layer, 0):,}" for layer in layers) if counted else ()),
        )
        for d in report["documents"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        [head, "", *("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)]
    )


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"example: {prog} outputs/distill/runs/<run>/export --layer 29 --top 10\n\n"
        "List a student's memory entries: use, origin and the tokens each promotes; given a memory pack\n"
        "(dmt-memorize), list its documents and the entries each gave.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("student", type=Path, help="export directory, .ckpt file or memory pack directory")
    parser.add_argument("--layer", type=int, help="block index of one memory layer (default: every one)")
    parser.add_argument("--top", type=int, default=20, help="rows per layer (default 20)")
    parser.add_argument("--tokens", type=int, default=5, help="promoted tokens per entry (default 5)")
    parser.add_argument("--sort", choices=SORTS, default="score", help="row order (default: LRFU score)")
    parser.add_argument("--head", type=int, help="logit lens of one head (default: the mean over heads)")
    parser.add_argument(
        "--student",
        dest="student_of_pack",
        type=Path,
        help="with a pack: the student that reads --texts with it",
    )
    parser.add_argument("--texts", nargs="+", help="with a pack: text files or folders to read (*.txt)")
    parser.add_argument("--window", type=int, default=512, help="reading window in tokens (default 512)")
    parser.add_argument("--stride", type=int, default=256, help="reading stride in tokens (default 256)")
    parser.add_argument("--index", help="key index of the pack's stores, e.g. faiss (default: the layer's)")
    parser.add_argument("--json", type=Path, help="also write the report (the same rows) as JSON here")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    for name in ("top", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if (args.student_of_pack is None) != (args.texts is None):
        parser.error("--student and --texts go together: the student reads the texts with the pack")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Print the memory report of a student; ``--json`` also writes it."""
    prog = command_name("dmt.inspect", "dmt-inspect")
    args = parse_args(argv, prog)
    with user_errors(prog, args.debug):
        if args.json is not None:
            refuse_existing_file(args.json, args.force, "--force")
        if is_pack(args.student):
            report: dict[str, Any] = {"pack": str(args.student)}
            if args.texts is None:
                report |= pack_report(read_pack(args.student))
            else:
                check_windows(args.window, args.stride, 1)
                texts = [read_text_file(path) for path in resolve_files(args.texts, "*.txt")]
                manifest, reads, ppl = pack_reads(
                    args.student_of_pack, args.student, texts, args.window, args.stride, args.index
                )
                report |= {"texts": len(texts), "perplexity": ppl, **pack_report(manifest, reads)}
            print(format_pack_report(report))
        else:
            if args.texts is not None:
                raise ConfigError(f"--texts: {args.student} is not a memory pack (give the pack first)")
            model, tokenizer = load_student(args.student)
            report = inspect_model(model, tokenizer, args.layer, args.top, args.tokens, args.sort, args.head)
            report = {"student": str(args.student), **report}
            print(format_report(report))
        if args.json is not None:
            print(f"\nJSON written to {write_json(args.json, report)}")


if __name__ == "__main__":
    main()
