"""``python -m dmt.export CKPT OUT_DIR``: write a Lightning checkpoint's student as an export directory.

The checkpoint is read with ``torch.load(weights_only=True)``; the directory loads with
``dmt.model.persistence.load_pretrained``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dmt.memory.store import VALUE_DTYPES
from dmt.model.persistence import export_checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmt.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt) of a distillation run")
    parser.add_argument("out_dir", help="export directory to write (replaced if it exists)")
    parser.add_argument(
        "--value-dtype",
        choices=VALUE_DTYPES,
        help="store the memory's values in this dtype (float16 halves them); default: as trained",
    )
    args = parser.parse_args(argv)
    print(f"exported: {export_checkpoint(args.ckpt, args.out_dir, value_dtype=args.value_dtype)}")


if __name__ == "__main__":
    main()
