"""The quality comparison: memory students against dense baselines under one training budget.

``python -m benchmarks.quality`` (see :mod:`benchmarks.quality.__main__`) runs the ``quality_*``
experiments (:mod:`benchmarks.quality.runner`) and collects their results into a table
(:mod:`benchmarks.quality.collect`).
"""

from benchmarks.quality.collect import RunResult, collect, markdown_tables, read_run
from benchmarks.quality.runner import run_comparison

__all__ = ["RunResult", "collect", "markdown_tables", "read_run", "run_comparison"]
