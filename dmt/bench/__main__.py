"""Entry point of ``python -m dmt.bench``."""

from dmt.bench.cli import main

raise SystemExit(main())
