"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DDP
averages the gradients.

    torchrun --nproc_per_node 2 -m amortized train ...                  # one machine
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m amortized train ...

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` joins the process
group (gloo on CPU, NCCL on GPUs). Every process builds the same model from the same seed,
takes its share of every minibatch, and DDP all-reduces the gradients, so one step sees
the whole minibatch. The helpers here keep the processes' decisions identical (skip a
step, stop early, keep the best epoch), which is what makes the loop safe to run on
many processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "World", "requested_size", "init", "all_agree", "all_sum", "all_gather_objects",
    "assert_in_sync", "finish",
]  # fmt: skip


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # joined by :func:`init`, so :func:`finish` leaves it

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0


def requested_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str) -> World:
    """Join the process group torchrun describes (if any) and return this process's World."""
    size = requested_size()
    if size == 1:
        return World()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), owns)


def all_agree(flag: bool, world: World) -> bool:
    """True on every process if ``flag`` is true on every process."""
    if world.size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def all_sum(value: float, world: World) -> float:
    """The sum of ``value`` over the processes (in float64), on every process."""
    if world.size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return float(total.item())


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every process's picklable ``obj``, in rank order, on every process."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def assert_in_sync(modules: list[nn.Module], world: World) -> None:
    """Raise if any process holds different parameters from rank 0 (DDP keeps them equal)."""
    if world.size == 1:
        return
    mine = torch.cat([p.detach().reshape(-1).double() for m in modules for p in m.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differ = mine.new_tensor([0.0 if torch.equal(mine, reference) else 1.0])
    dist.all_reduce(differ)
    if differ.item() > 0:
        raise RuntimeError(f"{int(differ.item())} processes ended with parameters unlike rank 0's")


def _device() -> torch.device:
    """Where collectives' tensors live: the GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def finish(world: World) -> None:
    """Wait for every process, then leave the process group if :func:`init` joined it."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        if world.owns_group:
            dist.destroy_process_group()
