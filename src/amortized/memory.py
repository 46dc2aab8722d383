"""How much memory a device has free: what size checks compare a need against."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["free_memory", "gib"]


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
