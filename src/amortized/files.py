"""Outputs written atomically: a file is either its old complete self or its new one.

Every report, table, figure and config the project writes goes through
:func:`write_atomic`: the bytes go to a temporary file in the same directory, are flushed
to disk, and the temporary file is renamed over the target (``os.replace`` is atomic on
POSIX and Windows). A kill or a full disk midway leaves the previous file untouched and
no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:  # advisory locks; where the platform has none, directories go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_file", "write_atomic", "check_writable", "lock_directory", "DirectoryBusy"]


class DirectoryBusy(RuntimeError):
    """Another process holds the directory (its lock names the process and host)."""


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only once the block ends without an error:
    written to a temporary file in the same directory, flushed to disk, renamed over
    ``path`` and the rename itself made durable. On any error (a kill, a full disk) the
    previous ``path`` is left as it was and the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
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


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def check_writable(path: str | Path, what: str = "output") -> None:
    """Raise ValueError, naming the path, if a file cannot be written there: checked
    before long work starts, so that a report is never computed only to be lost."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: directory {parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {path}: directory {parent} is not writable")


@contextlib.contextmanager
def lock_directory(directory: str | Path) -> Iterator[None]:
    """Hold ``directory/.lock`` for the duration, or raise :class:`DirectoryBusy` naming
    the process that holds it: two runs writing one directory would interleave their
    metrics and overwrite each other's weights. The lock is the operating system's
    (``flock``), so a killed holder releases it at once."""
    path = Path(directory) / ".lock"
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise DirectoryBusy(
                f"{directory} is in use by {holder}; wait for it to finish or choose "
                "another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
