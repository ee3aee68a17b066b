"""Alias: ``python -m dmt.eval [overrides]`` is ``python -m dmt.evaluation [overrides]``."""

from dmt.evaluation.__main__ import main, run_eval

__all__ = ["main", "run_eval"]

if __name__ == "__main__":
    main()
