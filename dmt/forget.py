"""``dmt-forget PACK --source GLOB``: remove from a memory pack every entry that matching documents gave.

Entries of one document do not depend on the others (:mod:`dmt.packs.reading`), so the pack afterwards
holds exactly what a pack memorised without those documents holds. The pack is changed in place (that is
what the command is for); ``pack.json`` is replaced atomically first, so an interruption leaves it either
as it was or without the documents.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmt.cli import pack_command, user_errors
from dmt.errors import ConfigError
from dmt.packs.files import forget_documents, matching, read_pack

EXAMPLE = "example: {prog} shakespeare.pack --source 'shakespeare/hamlet*' --source 'notes/*.txt'"


def main(argv: Sequence[str] | None = None) -> None:
    prog, parser = pack_command("dmt.forget", "dmt-forget", __doc__, EXAMPLE)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="GLOB",
        help="shell-style pattern of document names, as dmt-inspect PACK lists them (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the documents only; change nothing")
    args = parser.parse_args(argv)
    with user_errors(prog, args.debug):
        documents = matching(read_pack(args.pack).documents, args.source)
        if not documents:
            raise ConfigError(f"--source: {', '.join(args.source)} matches no document of {args.pack}")
        if not args.dry_run:
            forget_documents(args.pack, args.source)
    verb = "would forget" if args.dry_run else "forgot"
    entries = sum(sum(document.entries.values()) for document in documents)
    print(f"{verb} {len(documents)} documents ({entries:,} entries):")
    for document in documents:
        print(f"  {document.name}")


if __name__ == "__main__":
    main()
