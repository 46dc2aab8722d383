"""Checkpoints that survive being killed: atomic writes, safe loads, clear errors.

A checkpoint is written to a temporary file in the same directory, flushed to disk and
then renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so at
every instant the path holds either the previous complete checkpoint or the new one.
Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_atomic", "load_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not one of ours."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{path} is not an amortized checkpoint")
    return obj
