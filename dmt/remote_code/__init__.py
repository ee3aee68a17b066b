"""The code an export carries: ``transformers`` loads a dmt student with it (``trust_remote_code=True``).

Every file here imports only torch, numpy, transformers and its siblings (never ``dmt``), because
:func:`dmt.model.persistence.save_pretrained` copies them into the export directory, where the Hugging Face
auto classes import them without dmt installed.
"""

# The files an export carries, in the export directory's top level.
REMOTE_CODE_FILES = ("configuration_dmt.py", "modeling_dmt.py", "memory_ops.py", "hnsw_file.py")
