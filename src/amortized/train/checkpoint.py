"""Checkpoints that survive being killed: atomic writes, safe loads, clear errors.

A checkpoint is written to a temporary file in the same directory, flushed to disk and
then renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so at
every instant the path holds either the previous complete checkpoint or the new one.
Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``).

Every checkpoint carries a SHA-256 digest of its contents (every tensor's bytes, dtype and
shape, every key and value), checked on loading: a damaged file is refused even where the
damage falls inside tensor data, which the file format itself would load without a word.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_file

__all__ = ["CheckpointError", "save_atomic", "load_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not one of ours."""


DIGEST_KEY = "sha256"


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents, independent of how the file lays them out."""
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
        elif isinstance(value, list | tuple):
            h.update(f"L{type(value).__name__}{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            h.update(f"V{type(value).__name__}:{value!r}".encode())

    feed(obj)
    return h.hexdigest()


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically,
    with the digest of its contents."""
    path = Path(path)
    obj = {**obj, DIGEST_KEY: digest({k: v for k, v in obj.items() if k != DIGEST_KEY})}
    buffer = io.BytesIO()  # serialised first: a full disk is then the OS's one clear error
    torch.save(obj, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message for it advises unsafe loading
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"{path} holds a pickled Python object ({found[1]}), which is never loaded "
                "(unpickling can run code): it was not written by amortized"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be "
                              "read (it does not unpickle as tensors and numbers)") from None
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{path} is not an amortized checkpoint")
    stored = obj.pop(DIGEST_KEY, None)  # absent from checkpoints of earlier versions
    if stored is not None and stored != digest(obj):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the digest saved with "
            "them (the file was damaged after it was written)"
        )
    return obj


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""
