"""Atomic checkpoint writes and safe loads for Lightning.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file in the same directory, flushes it to disk and
renames it over the target, so a crash mid-write leaves the previous checkpoint intact; a write that fails for
want of space or permission raises ``CheckpointWriteError`` naming the file (e.g. "no space left on device").
Loads use ``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nanollada.errors import CheckpointWriteError


def write_error(e: OSError, path: Path) -> CheckpointWriteError:
    """The one-line error for a checkpoint write that failed with ``e`` (disk full, read-only, ...)."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return CheckpointWriteError(f"{reason} writing checkpoint {path} (the previous checkpoint, if any, is intact): "
                                "free space or set the ModelCheckpoint dirpath to another disk")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic rename on save, ``weights_only=True`` on load."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
