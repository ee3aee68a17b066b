"""The quality comparison: memory students against dense baselines under one training budget.

``python -m dmt.quality`` (see :mod:`dmt.quality.__main__`) runs the ``quality_*`` experiments
(:mod:`dmt.quality.runner`) and collects their results into a table (:mod:`dmt.quality.collect`).
"""

from dmt.quality.collect import RunResult, collect, markdown_tables, read_run
from dmt.quality.runner import run_comparison

__all__ = ["RunResult", "collect", "markdown_tables", "read_run", "run_comparison"]
