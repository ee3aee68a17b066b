"""``python -m benchmarks.quality``: memory students against the removed and low-rank baselines, one budget.

python -m benchmarks.quality --budget-minutes 60 --configs upper all --out results/quality
python -m benchmarks.quality --budget-minutes 60 --configs upper -- data.max_val_blocks=4
python -m benchmarks.quality --collect-only results/quality/runs/* --out results/quality

Runs ``distill.py experiment=quality_<config>_<variant>`` for every variant (memory, removed, lowrank) of
every config, each for ``--budget-minutes`` of training, then writes ``results.json`` and
``results.md`` (the comparison table, then one row per run) into ``--out`` and prints the tables.
Hydra overrides after ``--`` go to every run. Exits non-zero if a run failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.quality.collect import VARIANTS, collect, markdown_tables, read_run
from benchmarks.quality.runner import configurations, run_comparison


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="training time per run")
    parser.add_argument("--max-steps", type=int, default=None, help="also stop a run after this many steps")
    parser.add_argument("--configs", nargs="+", default=None, help=f"of {configurations()} (default: all)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("results/quality"), help="results directory")
    parser.add_argument("--force", action="store_true", help="rerun runs that finished earlier")
    parser.add_argument(
        "--collect-only", nargs="+", metavar="RUN_DIR", help="only build the table from these run directories"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collect_only:
        run_dirs = [Path(p) for p in args.collect_only]
        settings = {"collected_from": [str(p) for p in run_dirs]}
    else:
        settings = {
            "budget_minutes": args.budget_minutes,
            "max_steps": args.max_steps,
            "configs": args.configs or configurations(),
            "variants": args.variants,
            "overrides": args.overrides,
        }
        run_dirs = run_comparison(
            settings["configs"],
            args.out,
            args.budget_minutes,
            args.max_steps,
            args.variants,
            args.overrides,
            args.force,
        )
    collect(run_dirs, args.out, settings)
    runs = [read_run(run_dir) for run_dir in run_dirs]
    print("\n" + markdown_tables(runs))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 1 if any(run.status != "ok" for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
