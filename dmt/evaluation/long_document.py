"""Reading a long document window by window: perplexity per quarter, with and without memory inserts.

``dmt-long-document student=<export or .ckpt> document=<text file>`` scores one
document with sliding windows (``conf/long_document.yaml``: window 512, stride 256) three ways: the
teacher, the student with its memory as trained (no inserts), and the student inserting as it reads (every
memory layer with a ``novelty_threshold`` stores the novel keys and values of each window after searching
it, so later windows can retrieve what earlier ones held). With ``from_empty: true`` a fourth reading
inserts as it reads into emptied stores, so that what the document's own entries do is told apart from
what the memory held before. Each quarter of the document gets its own perplexity: a memory that carries
what the window has lost shows up as lower perplexity in later quarters. Prints a table and writes
``output`` as JSON (by default in the run directory). Each reading shows a progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from dmt.cli import run_hydra_task
from dmt.conf import CONFIG_PATH  # (importing dmt.conf registers the configs' resolvers)
from dmt.errors import ConfigError
from dmt.evaluation.perplexity import check_windows, scored_tokens, sliding_window_nll
from dmt.files import read_text_file, refuse_existing_file, write_json
from dmt.model.loading import load_teacher, load_tokenizer
from dmt.model.persistence import check_student_path, load_student
from dmt.model.surgery import memory_layers, memory_protocol
from dmt.packs.disk import DISK
from dmt.packs.reading import pack_index
from dmt.progress import progress_bar, set_quiet

QUARTERS = 4


@contextmanager
def inserting_memory(model: PreTrainedModel) -> Iterator[int]:
    """Within the block, memory layers that insert in training (``novelty_threshold`` set) insert in
    evaluation too, writing at once; yields how many layers do. Each forward of ``model`` hands them its
    ``input_ids`` (:meth:`MemoryProtocol.each_forward`), so what they insert records the text it came
    from. What they stored stays."""
    protocol = memory_protocol(model)
    with protocol.each_forward(model, insert=True):
        yield sum(layer.cfg.novelty_threshold is not None for layer in protocol.layers.values())


def quarter_perplexities(
    model: PreTrainedModel, input_ids: torch.Tensor, window: int, stride: int, desc: str = "reading"
) -> dict[str, Any]:
    """Perplexity of each quarter of ``input_ids (L,)`` (by target position), windows read in order.

    Returns ``{"quarters": [4 × {"perplexity", "nll", "tokens"}], "whole": {...}}``.
    """
    token_nll = torch.full((input_ids.numel(),), math.nan, dtype=torch.float64)  # (L,)
    with progress_bar(scored_tokens(input_ids.numel(), window, stride), desc) as bar:
        sliding_window_nll(model, input_ids, window, stride, batch_size=1, token_nll=token_nll, progress=bar)
    bounds = torch.linspace(0, input_ids.numel(), QUARTERS + 1).round().long().tolist()

    def summary(part: torch.Tensor) -> dict[str, float]:
        scored = part[~part.isnan()]
        nll = float(scored.sum())
        return {"perplexity": math.exp(nll / len(scored)), "nll": nll, "tokens": len(scored)}

    quarters = [summary(token_nll[a:b]) for a, b in pairwise(bounds)]
    return {"quarters": quarters, "whole": summary(token_nll)}


def store_counts(model: PreTrainedModel) -> dict[str, int]:
    """Entries inserted into and evicted from all of ``model``'s stores so far."""
    stats = [layer.store.stats for layer in memory_layers(model).values()]
    return {"inserted": sum(s.inserts for s in stats), "evicted": sum(s.evictions for s in stats)}


def inserting_reading(
    student: PreTrainedModel, input_ids: torch.Tensor, window: int, stride: int, desc: str
) -> dict[str, Any]:
    """The student reading ``input_ids`` while its memory inserts, and how many entries that inserted and
    evicted (a full store evicts as it inserts: its size alone would not show what the reading stored)."""
    with inserting_memory(student) as layers:
        if not layers:
            raise ValueError("the student has no memory layer that inserts (novelty_threshold: null)")
        before = store_counts(student)
        reading = quarter_perplexities(student, input_ids, window, stride, desc)
        after = store_counts(student)
    return reading | {f"entries_{name}": after[name] - before[name] for name in ("inserted", "evicted")}


def read_document(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    input_ids: torch.Tensor,
    window: int,
    stride: int,
    from_empty: bool = False,
) -> dict[str, Any]:
    """The readings of the module docstring, as ``{"rows": [{"name", "quarters": [...]}]}``.

    The student is read without inserts first; the inserting reading then grows its memory. With
    ``from_empty`` the stores of the layers that insert are then replaced by empty ones (the student is
    changed in place) and read into once more.
    """
    names = ["teacher", "student", "student, inserting", "student, inserting into empty memory"]
    rows = [
        {"name": name, **quarter_perplexities(model, input_ids, window, stride, name)}
        for name, model in zip(names, (teacher, student), strict=False)
    ]
    rows.append({"name": names[2], **inserting_reading(student, input_ids, window, stride, names[2])})
    if from_empty:
        for layer in memory_layers(student).values():
            if layer.cfg.novelty_threshold is not None:
                layer.use_store(layer.empty_store())
        rows.append({"name": names[3], **inserting_reading(student, input_ids, window, stride, names[3])})
    return {"rows": rows, "settings": {"window": window, "stride": stride, "tokens": input_ids.numel()}}


def format_table(result: dict[str, Any]) -> str:
    """Perplexity per quarter and overall, one row per reading."""
    width = max(len(row["name"]) for row in result["rows"]) + 2
    header = (
        f"{'reading':<{width}}" + "".join(f"{f'Q{q + 1}':>10}" for q in range(QUARTERS)) + f"{'whole':>10}"
    )
    lines = [header]
    for row in result["rows"]:
        values = [*row["quarters"], row["whole"]]
        lines.append(f"{row['name']:<{width}}" + "".join(f"{v['perplexity']:>10.2f}" for v in values))
    return "\n".join(lines)


def run_long_document(cfg: DictConfig) -> dict[str, Any]:
    """The whole reading from a composed ``long_document`` config; prints the table, writes ``cfg.output``.

    Everything the user named (output, student, document, window settings) is checked before a model loads.
    """
    if cfg.get("quiet"):
        set_quiet()
    for key in ("student", "document"):
        if cfg[key] is None:
            raise ConfigError(f"{key}: required; give {key}=<path> (an export or .ckpt, and a text file)")
    index = pack_index(cfg.get("memory_index"))
    if index is not None and index.get("backend") == DISK:
        raise ConfigError(
            "memory_index: backend disk reads a pack read-only, and this reading inserts as it reads; "
            "load the pack into memory (memory_index: null or {backend: faiss})"
        )
    if cfg.output:
        refuse_existing_file(cfg.output, cfg.get("force", False))
    check_windows(cfg.window, cfg.stride, 1)
    check_student_path(cfg.student)
    text = read_text_file(cfg.document)
    tokenizer = load_tokenizer(cfg.teacher)
    input_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # (L,)
    if cfg.max_tokens is not None:
        input_ids = input_ids[: cfg.max_tokens]
    student = load_student(cfg.student, cfg.get("memory"), index, cfg.get("memory_read"))[0]
    teacher = load_teacher(cfg.teacher)
    result = read_document(teacher, student, input_ids, cfg.window, cfg.stride, cfg.from_empty)
    result |= {"student": str(cfg.student), "document": str(cfg.document)}
    print(format_table(result))
    if cfg.output:
        print(f"\nwritten: {write_json(cfg.output, result)}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="long_document")
def main(cfg: DictConfig) -> None:
    run_hydra_task(run_long_document, cfg, "dmt.evaluation.long_document", "dmt-long-document")


if __name__ == "__main__":
    main()
