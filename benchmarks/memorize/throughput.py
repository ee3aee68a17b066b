"""Reading text into a memory pack against the teacher's own forward over the same windows: tokens/s of
each, measured side by side (alternating, median of the repeats) in one process.

python -m benchmarks.memorize.throughput STUDENT TEXT [--tokens 4096] [--window 512] [--stride 448]

STUDENT: an export whose memory inserts; TEXT: a text file the tokens are taken from. The teacher is the
one of ``conf/teacher/smollm2.yaml``. Writes ``--out`` (JSON) and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from dmt.evaluation.perplexity import window_batch, windows
from dmt.files import read_text_file, write_json
from dmt.model.loading import load_teacher
from dmt.model.persistence import load_pretrained
from dmt.packs.reading import document_entries


@torch.no_grad()
def forward_windows(model, input_ids: torch.Tensor, window: int, stride: int, batch_size: int) -> None:
    """``model``'s forward over the windows ``document_entries`` reads, batched the same way."""
    spans = windows(input_ids.numel(), window, stride)
    for start in range(0, len(spans), batch_size):
        ids, mask = window_batch(input_ids, spans[start : start + batch_size])
        model(input_ids=ids, attention_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/memorize/throughput.json"))
    args = parser.parse_args()
    student, tokenizer = load_pretrained(args.student)
    input_ids = torch.tensor(tokenizer(read_text_file(args.text))["input_ids"][: args.tokens])
    with initialize_config_module("dmt.conf", version_base="1.3"):
        teacher = load_teacher(compose("eval").teacher)
    settings = (args.window, args.stride, args.batch_size)
    timings: dict[str, list[float]] = {"teacher forward": [], "memorize": []}
    runs = {
        "teacher forward": lambda: forward_windows(teacher, input_ids, *settings),
        "memorize": lambda: document_entries(student, input_ids, *settings),
    }
    for _ in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    rates = {name: input_ids.numel() / statistics.median(t[1:]) for name, t in timings.items()}
    result = {
        "command": "python -m benchmarks.memorize.throughput "
        + " ".join(
            [
                str(args.student),
                str(args.text),
                f"--tokens {args.tokens}",
                f"--window {args.window}",
                f"--stride {args.stride}",
                f"--batch-size {args.batch_size}",
                f"--repeats {args.repeats}",
            ]
        ),
        "tokens": input_ids.numel(),
        "seconds": {name: t[1:] for name, t in timings.items()},
        "tokens_per_second": rates,
        "memorize_over_teacher": rates["memorize"] / rates["teacher forward"],
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
