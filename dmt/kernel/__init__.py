"""The memory read in torch alone, and the code an export carries so that ``transformers`` loads a
student without dmt (``trust_remote_code=True``).

- :mod:`.ops`: a memory layer's projections, and the scoring, weighting and mixing of what it read;
- :mod:`.search`: exact k-nearest search over a table of keys;
- :mod:`.dense`: the dense baselines' forward (an MLP removed, a narrower MLP);
- :mod:`.store_files`: a saved store's manifest, integrity checks and keys held in an hnsw graph;
- :mod:`.pack_files`: a memory pack's documents and shards, and the fingerprint of its student;
- :mod:`.read`: the swapped layers of a saved student, reading only;
- :mod:`.configuration_dmt`, :mod:`.modeling_dmt`: the ``transformers`` classes of an export.

``dmt.layers``, ``dmt.memory`` and ``dmt.packs`` build on the first five. Every file here imports only
torch, numpy, ``transformers`` (the last two files) and its siblings, never the rest of dmt:
:func:`dmt.model.persistence.save_pretrained` copies them into each export as they are, where the Hugging
Face auto classes import them.
"""

# The files an export carries, in the export directory's top level.
FILES = (
    "configuration_dmt.py",
    "modeling_dmt.py",
    "read.py",
    "ops.py",
    "search.py",
    "dense.py",
    "store_files.py",
    "pack_files.py",
)
