"""``python -m dmt.distill [overrides]``: the same app as ``dmt-distill``."""

from dmt.distill.cli import distill_main

distill_main()
