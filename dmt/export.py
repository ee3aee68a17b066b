"""``dmt-export CKPT OUT_DIR``: write a Lightning checkpoint's student as an export directory.

The checkpoint is read with ``torch.load(weights_only=True)`` (nothing is unpickled); the directory loads
with ``dmt.model.persistence.load_pretrained`` or plain ``transformers`` (``trust_remote_code=True``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dmt.cli import command_name, user_errors
from dmt.memory.store import VALUE_DTYPES
from dmt.model.persistence import export_checkpoint
from dmt.progress import set_quiet

EXAMPLE = "example: {prog} outputs/distill/runs/<run>/checkpoints/last.ckpt my-export --value-dtype float16"
NOTES = """OUT_DIR is written aside and renamed into place when complete. An existing OUT_DIR is replaced
only when it holds a previous dmt export, or with --force; never when it holds the checkpoint or the
current directory."""


def main(argv: Sequence[str] | None = None) -> None:
    prog = command_name("dmt.export", "dmt-export")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{EXAMPLE.format(prog=prog)}\n\n{__doc__.splitlines()[0]}",
        epilog=NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt) of a distillation run")
    parser.add_argument("out_dir", help="export directory to write (new, empty, or a previous export)")
    parser.add_argument(
        "--value-dtype",
        choices=VALUE_DTYPES,
        help="store the memory's values in this dtype (float16 halves them); default: as trained",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR whatever it holds")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    if args.quiet:
        set_quiet()
    with user_errors(prog, args.debug):
        out_dir = export_checkpoint(args.ckpt, args.out_dir, value_dtype=args.value_dtype, force=args.force)
    print(f"exported: {out_dir}")


if __name__ == "__main__":
    main()
