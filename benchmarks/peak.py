"""This machine's matmul peak, the yardstick of the benchmarks' achieved FLOP/s, and the
arithmetic they count."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for a GPU's queued work (timings on a GPU are otherwise launch times)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """The clock a benchmark's FLOP/s are read on: this process's CPU time on a CPU, so a
    job that shares its cores with others is not charged for their time (compare the
    contender's CPU time over wall time, printed beside it); wall time on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def peak_flops(device: torch.device | str = "cpu", size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` float32 ``size`` x ``size`` matrix products,
    on :func:`clock`."""
    device = torch.device(device)
    now = clock(device)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        sync(device)
        start = now()
        a @ b
        sync(device)
        times.append(now() - start)
    return 2 * size**3 / min(times)


def counted_flops(run) -> int:
    """The matrix-product FLOPs that ``run()`` performs, forward and backward, by PyTorch's
    own formulas (``torch.utils.flop_counter.flop_registry``) applied to every op that
    reaches the dispatcher: the check on a benchmark's analytical count. (``FlopCounterMode``
    itself cannot watch ``torch.autograd.grad`` with respect to a leaf, which AIS takes.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    def shape(t):
        return t.shape if isinstance(t, torch.Tensor) else t

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += formula(*tree_map(shape, args), **tree_map(shape, kwargs),
                                         out_val=tree_map(shape, out))  # fmt: skip
            return out

    with Counter():
        run()
    return Counter.total


def decoder_macs(model) -> int:
    """Multiply-adds of one decoder pass for one z (its Linear layers)."""
    return sum(m.in_features * m.out_features for m in model.decoder.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
