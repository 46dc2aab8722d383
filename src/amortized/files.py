"""Outputs written atomically: a file is either its old complete self or its new one.

Every report, table, figure and config the project writes goes through
:func:`write_atomic`: the bytes go to a temporary file in the same directory, are flushed
to disk, and the temporary file is renamed over the target (``os.replace`` is atomic on
POSIX and Windows). A kill or a full disk midway leaves the previous file untouched and
no temporary file behind (a kill of the whole process can leave one; the next holder of
the directory's lock removes it). A symbolic link planted where an output goes is
replaced, never written through.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

try:  # advisory locks; where the platform has none, directories go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_file", "write_atomic", "check_writable", "lock_directory", "DirectoryBusy",
           "open_for_append", "remove_stale_temporaries", "Stages"]


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
        os.replace(tmp, path)  # over a symbolic link, this replaces the link, not its target
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:  # a failed write names no file: name the one it was for
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
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


#: Directories this process holds (a study holds its run directory, and the training it
#: runs takes the same lock again).
_HELD: set[Path] = set()
#: The temporary files :func:`atomic_file` makes: ``.{name}.{8 random characters}.tmp``.
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def lock_directory(directory: str | Path) -> Iterator[None]:
    """Hold ``directory/.lock`` for the duration, or raise :class:`DirectoryBusy` naming
    the process that holds it: two runs writing one directory would interleave their
    metrics and overwrite each other's weights. The lock is the operating system's
    (``flock``), so a killed holder releases it at once. Taking it again in the process
    that holds it is a no-op. Once it is held, the temporary files a killed writer left
    there are removed: every writer of a run directory holds its lock, so none is live."""
    key = Path(directory).resolve()
    if key in _HELD or fcntl is None:
        yield
        return
    path = Path(directory) / ".lock"
    fd = _open_no_link(path, os.O_RDWR | os.O_CREAT)
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
        _HELD.add(key)
        remove_stale_temporaries(directory)
        try:
            yield
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_file` that a killed writer left in
    ``directory`` (call it only while holding the directory's lock); returns them."""
    stale = [p for p in Path(directory).glob(".*.tmp")
             if _TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink()]  # fmt: skip
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def open_for_append(path: str | Path) -> BinaryIO:
    """``path`` opened to append to, created if absent; a symbolic link there is refused
    (an output never writes through a link planted in its directory)."""
    return os.fdopen(_open_no_link(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")


def _open_no_link(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path``, naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise OSError(err.errno, "is a symbolic link; outputs never follow links: remove it",
                          str(path)) from None  # fmt: skip
        raise


class Stages:
    """Which outputs of a run directory are finished, and for which settings
    (``stages.json``: the settings' key and the finished files' names).

    Opened with a key that differs from the one recorded, or in a directory holding
    outputs (files matching ``outputs``) that no record vouches for, it first moves those
    into ``replaced/N/`` (N = 1, 2, ...) with a note saying why, and records the new key.
    Hold the directory's lock while using it.
    """

    FILE = "stages.json"

    def __init__(self, run_dir: str | Path, key: str, outputs: Sequence[str]):
        run_dir = Path(run_dir)
        self.run_dir, self.key, self.path, self.outputs = run_dir, key, run_dir / self.FILE, outputs
        try:
            record = json.loads(self.path.read_text())
            done = list(record["done"]) if record["key"] == key else None
        except (OSError, ValueError, KeyError, TypeError):
            record, done = None, None
        if done is None:
            self._set_aside(record.get("key") if isinstance(record, dict) else None)
            done = []
        self.done = done
        self._save()

    def finished(self, name: str) -> bool:
        return name in self.done and (self.run_dir / name).is_file()

    def finish(self, name: str) -> None:
        self.done.append(name)
        self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps({"key": self.key, "done": self.done}, indent=2))

    def _set_aside(self, old_key: str | None) -> None:
        outputs = sorted({p for pattern in self.outputs for p in self.run_dir.glob(pattern)})
        if not outputs:
            return
        n = 1
        while (self.run_dir / "replaced" / str(n)).exists():
            n += 1
        aside = self.run_dir / "replaced" / str(n)
        aside.mkdir(parents=True)
        for path in outputs:
            path.rename(aside / path.name)
        why = (f"settings {old_key}" if old_key else "settings no record vouches for")
        write_atomic(aside / "WHY.txt", f"Outputs of a study with {why}, set aside when one "
                     f"with settings {self.key} began in {self.run_dir}.\n")  # fmt: skip
        warnings.warn(f"{self.run_dir} held outputs of other settings; they were moved to "
                      f"{aside}", stacklevel=3)  # fmt: skip
