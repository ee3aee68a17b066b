"""Memory packs: a corpus memorised by a student's inserting memory layers, kept apart from the student.

:mod:`dmt.packs.files` is the pack directory (written crash-safe, forgotten and merged by document);
:mod:`dmt.packs.reading` reads a corpus into a pack and puts a pack into a student.
"""

from dmt.packs.files import PackError, PackManifest, forget_documents, merge_packs, read_pack
from dmt.packs.reading import memorize, open_pack, pack_manifest, use_pack

__all__ = [
    "PackError",
    "PackManifest",
    "forget_documents",
    "memorize",
    "merge_packs",
    "open_pack",
    "pack_manifest",
    "read_pack",
    "use_pack",
]
