"""This machine's matmul peak, the yardstick of the benchmarks' achieved FLOP/s, and the
arithmetic they count."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for a GPU's queued work (timings on a GPU are otherwise launch times)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device | str = "cpu", size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` float32 ``size`` x ``size`` matrix products."""
    device = torch.device(device)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def decoder_macs(model) -> int:
    """Multiply-adds of one decoder pass for one z (its Linear layers)."""
    return sum(m.in_features * m.out_features for m in model.decoder.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
