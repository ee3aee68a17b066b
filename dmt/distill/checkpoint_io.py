"""Crash-safe checkpoint files."""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dmt.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, fsyncs it, then renames it into place.

    A rename within one directory is atomic, so a crash (or ``kill -9``) mid-save leaves either the previous
    checkpoint or the new one, never a truncated file (:func:`dmt.files.atomic_file`). Lightning's own
    writer stages the file in the system temp directory and then moves it, which is a copy (not atomic)
    across file systems.
    Remote paths (``s3://`` …) fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_file(path) as handle:
            torch.save(checkpoint, handle)
