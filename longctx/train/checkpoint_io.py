"""Checkpoint writes that never leave a half-written file behind (a full disk, a kill mid-write)."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from longctx.core.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through `longctx.core.files.atomic_write`.

    Lightning's own writer stages the bytes in the system temp folder and moves them into
    place; on a cluster that folder is usually another filesystem (local /tmp, shared
    checkpoints), where the move is a copy into the target that a full disk interrupts midway,
    truncating the previous last.ckpt. Remote URLs (s3://...) keep Lightning's writer: object
    stores publish an upload only once it is complete.
    """

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike,
        storage_options: Any | None = None,
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options, got {storage_options!r}"
            )
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))
