"""``dmt-index PACK``: file a memory pack's keys in a saved inverted-file index, so that the pack can be
searched where it lies (``memory_index={backend: disk}``), even when it is larger than RAM.

Every layer of the pack is indexed (:func:`dmt.packs.disk.index_pack`): k-means centroids and each
entry's list, written to ``PACK/index/`` atomically; the shards are not changed. Forgetting documents
keeps the index valid; a pack merged or memorised into since must be indexed again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dmt.cli import pack_command, user_errors
from dmt.errors import ConfigError
from dmt.memory.integrity import store_errors
from dmt.packs.disk import index_pack
from dmt.packs.files import PackError, read_pack

EXAMPLE = "example: {prog} plays.pack   then   dmt-eval ... memory=plays.pack 'memory_index={{backend:disk}}'"


def main(argv: Sequence[str] | None = None) -> None:
    prog, parser = pack_command("dmt.index", "dmt-index", __doc__, EXAMPLE)
    parser.add_argument(
        "--nlist",
        type=int,
        help="inverted lists per layer (default: the power of two nearest 4·sqrt(entries))",
    )
    args = parser.parse_args(argv)
    with user_errors(prog, args.debug):
        if args.nlist is not None and args.nlist < 1:
            raise ConfigError(f"--nlist: expected an integer >= 1, got {args.nlist}")
        manifest = read_pack(args.pack)
        for block, entries in manifest.entries().items():
            if args.nlist is not None and args.nlist > entries:
                raise ConfigError(f"--nlist: {args.nlist} lists for {entries} entries of block {block}")
            started = time.perf_counter()
            with store_errors(PackError):
                index_pack(args.pack, block, args.nlist)
            print(f"indexed block {block}: {entries:,} entries in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
