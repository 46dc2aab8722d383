"""How much memory a device has free (what size checks compare a need against), and how
the host's allocator keeps what is freed."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

__all__ = ["free_memory", "gib", "release_freed_memory", "tune_allocator"]

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 128 * 2**20) -> bool:
    """Keep freed CPU memory for the next step instead of returning it to the system at
    once (glibc's malloc; elsewhere nothing is done). Returns whether it was applied.

    A training step of the IAF family allocates and frees tensors of about 12 MB (its
    per-row weights, 100 rows). glibc hands such memory back to the system when a step's
    tensors are freed together and takes it back, page by page, in the next: 27 ms a
    step against 19 ms with blocks below ``mmap_threshold`` served from the heap and up to
    ``trim_threshold`` bytes of free heap kept (``benchmarks/RESULTS.md``, issue 18). The
    command line applies it; a program that calls :func:`amortized.train.train` may too.
    It changes no result, only where memory comes from.
    """
    if _GLIBC is None:
        return False
    return bool(_GLIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        _GLIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def release_freed_memory() -> None:
    """Hand the pages of freed tensors back to the OS (glibc's ``malloc_trim``; elsewhere
    nothing). A chunk's graph is freed at once, but the small outputs kept between chunks
    pin the freed space, so without this the process's resident memory still grows with
    the samples (:func:`amortized.iwae_bound` and :func:`amortized.elbo`)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both present, or neither is used
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_GLIBC = _glibc()


def free_memory(device: str) -> int | None:
    """Bytes of memory free on ``device`` (the host's available memory for the CPU), or
    None where it cannot be told."""
    where = torch.device(device)
    if where.type == "cuda":
        return torch.cuda.mem_get_info(where)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int) -> str:
    """Bytes as GiB, for messages."""
    return f"{n / 2**30:.1f} GiB"
