"""Fine-tuning the teacher on the text a memory pack holds, for the wall-clock minutes memorising it took:
the baseline a pack must beat on the memorised domain.

python -m benchmarks.memorize.fine_tune --minutes 47 --exclude GLOB ... --validation NAME --held-out NAME ...

Every parameter of the teacher (``conf/teacher/smollm2.yaml``) trains on next-token cross-entropy over the
Shakespeare source less the excluded documents, cut into windows of ``--window`` tokens (each document on
its own, shuffled), AdamW at ``--lr`` after ``--warmup`` steps of linear warm-up, until ``--minutes`` of
training have passed. The validation and held-out documents (their first ``--chars`` characters) are then
read as ``dmt-eval`` reads them (window 512, stride 256), by the teacher before and by the fine-tuned model
after. Writes ``--out`` (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from benchmarks.memorize.read_settings import document_text
from dmt.data.corpus import read_source
from dmt.evaluation.perplexity import perplexity
from dmt.files import write_json
from dmt.model.loading import load_teacher, load_tokenizer

SOURCE = "shakespeare"


def training_windows(tokenizer, exclude: list[str], window: int, seed: int) -> torch.Tensor:
    """``(W, window)`` token windows of the source's documents less ``exclude``, in a shuffled order."""
    chunks = []
    for document in read_source(SOURCE):
        if any(fnmatch.fnmatchcase(document.name, pattern) for pattern in exclude):
            continue
        ids = torch.tensor(tokenizer(document.text)["input_ids"])  # (L,)
        usable = len(ids) // window * window
        chunks.append(ids[:usable].view(-1, window))
    windows = torch.cat(chunks)
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))]


def read(model, tokenizer, names: list[str], chars: int) -> dict:
    texts = [document_text(name, chars) for name in names]
    return perplexity(model, tokenizer, texts, 512, 256, 4, "reading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--exclude", nargs="*", default=[])
    parser.add_argument("--validation", required=True)
    parser.add_argument("--held-out", nargs="+", required=True)
    parser.add_argument("--chars", type=int, default=32000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/memorize/fine_tune.json"))
    args = parser.parse_args()
    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("eval").teacher
    model, tokenizer = load_teacher(cfg), load_tokenizer(cfg)
    before = {
        "validation": read(model.eval(), tokenizer, [args.validation], args.chars),
        "held_out": read(model, tokenizer, args.held_out, args.chars),
    }
    windows = training_windows(
        tokenizer, [*args.exclude, args.validation, *args.held_out], args.window, args.seed
    )

    # Training: whole model (the teacher is loaded frozen), next-token cross-entropy, until the time is up
    model.requires_grad_(True)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    model.train()
    started, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - started < args.minutes * 60 and step * args.batch_size < len(windows):
        batch = windows[step * args.batch_size : (step + 1) * args.batch_size]  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % 10 == 0:
            print(
                f"step {step}: loss {sum(losses[-10:]) / 10:.3f}, {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    seconds = time.perf_counter() - started
    model.eval()
    after = {
        "validation": read(model, tokenizer, [args.validation], args.chars),
        "held_out": read(model, tokenizer, args.held_out, args.chars),
    }
    result = {
        "command": "python -m benchmarks.memorize.fine_tune " + shlex.join(sys.argv[1:]),
        "training": {
            "seconds": seconds,
            "steps": step,
            "tokens": step * args.batch_size * args.window,
            "of_tokens": windows.numel(),
            "lr": args.lr,
            "batch_size": args.batch_size,
            "window": args.window,
            "last_losses": losses[-10:],
        },
        "teacher": before,
        "fine_tuned": after,
        "held_out_ratio_to_teacher": math.exp(
            (after["held_out"]["nll"] - before["held_out"]["nll"]) / before["held_out"]["tokens"]
        ),
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
