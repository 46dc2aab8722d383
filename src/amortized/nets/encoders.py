"""Amortized inference networks: x -> lambda(x), the parameters of q(z; lambda).

An encoder is any ``nn.Module`` that maps a batch of data ``(batch, *data_shape)`` to a
parameter tensor ``(batch, family.num_params)``; its last layer is the family's
:meth:`~amortized.VariationalFamily.amortized_head`. It computes for every x what
:func:`amortized.fit_local` would otherwise find by optimisation, in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..families import VariationalFamily
from .layers import ACTIVATIONS, mlp

__all__ = ["MLPEncoder"]


class MLPEncoder(nn.Module):
    """The VAE encoder of Kingma & Welling (2014): an MLP from flat x to lambda(x).

    Example:
        >>> from amortized import DiagonalGaussian
        >>> import torch
        >>> family = DiagonalGaussian(2)
        >>> encoder = MLPEncoder(data_dim=5, family=family, hidden=(8,))
        >>> encoder(torch.zeros(3, 5)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        data_dim: int,
        family: VariationalFamily,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ):
        super().__init__()
        self.data_dim = data_dim
        self.num_params = family.num_params
        hidden = tuple(hidden)
        body: list[nn.Module] = []
        if hidden:  # the layers of mlp(data_dim, hidden, ...) up to its output layer
            body = [*mlp(data_dim, hidden[:-1], hidden[-1], activation), ACTIVATIONS[activation]()]
        head_in = hidden[-1] if hidden else data_dim
        self.net = nn.Sequential(*body, family.amortized_head(head_in))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(flat_data(x, self.data_dim, "MLPEncoder"))  # (batch, num_params)


def flat_data(x: Tensor, data_dim: int, who: str) -> Tensor:
    """x as ``(batch, data_dim)``, or a ValueError naming ``who`` and the sizes."""
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != data_dim:
        raise ValueError(f"{who} expects {data_dim} values per datapoint, got {x.shape[1]}")
    return x
