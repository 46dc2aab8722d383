"""Small network building blocks shared by encoders and decoders."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "adam", "mlp"]

#: Name -> activation module table used by configs and the command line.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, activation: str = "tanh"
) -> nn.Sequential:
    """A fully connected network ``in -> hidden[0] -> ... -> out`` with no output activation.

    Like ``nn.Linear`` it maps ``(*batch, in_features)`` to ``(*batch, out_features)``, so
    the same network serves one datapoint, a batch, or ``(samples, batch)`` at once.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    sizes = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)


def adam(parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel where PyTorch has one (float tensors on a CPU or a GPU).

    On the small networks of this field the optimizer step is a fifth of a training step,
    and the fused kernel is about 4x faster than the default loop over tensors
    (``benchmarks/throughput.py``); the update is the same up to rounding.
    """
    params = list(parameters)
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )
    return torch.optim.Adam(params, lr=lr, fused=fused or None)
