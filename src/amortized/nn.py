"""Small network building blocks shared by encoders and decoders."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["ACTIVATIONS", "mlp"]

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
