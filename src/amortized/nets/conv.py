"""Convolutional encoder and decoder for images, with the flat-data interface of the MLPs.

Data stay flat, ``(batch, H * W)``, as everywhere in the library; these networks view them
as one-channel images. Each of the ``channels`` stages halves (encoder) or doubles
(decoder) the height and width with a 4 x 4 convolution of stride 2, so H and W must be
divisible by 2 ** len(channels): 28 x 28 MNIST goes 28 -> 14 -> 7 with two stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from ..families import VariationalFamily
from .decoders import LogitBernoulli
from .encoders import flat_data
from .layers import ACTIVATIONS, mlp

__all__ = ["ConvEncoder", "ConvDecoder"]


def _check_shape(image_shape: Sequence[int], channels: Sequence[int], who: str) -> tuple[int, int]:
    if len(image_shape) != 2:
        raise ValueError(f"{who} needs image_shape (height, width), got {tuple(image_shape)}")
    if not channels or min(channels) < 1:
        raise ValueError(f"{who} needs at least one stage of >= 1 channels, got {channels}")
    step = 2 ** len(channels)
    h, w = image_shape
    if h % step or w % step:
        raise ValueError(
            f"{who}: {len(channels)} stride-2 stages need height and width divisible by "
            f"{step}, got {h} x {w}"
        )
    return h // step, w // step


class ConvEncoder(nn.Module):
    """x -> lambda(x): stride-2 convolutions, then an MLP to the family's parameters.

    Example:
        >>> from amortized import DiagonalGaussian
        >>> encoder = ConvEncoder((8, 8), DiagonalGaussian(2), channels=(4, 8), hidden=(16,))
        >>> encoder(torch.zeros(3, 64)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        family: VariationalFamily,
        channels: Sequence[int] = (32, 64),
        hidden: Sequence[int] = (200,),
        activation: str = "relu",
    ):
        super().__init__()
        h, w = _check_shape(image_shape, channels, "ConvEncoder")
        self.image_shape = tuple(image_shape)
        self.data_dim = math.prod(self.image_shape)
        self.num_params = family.num_params
        layers: list[nn.Module] = []
        for c_in, c_out in zip((1, *channels[:-1]), channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.conv = nn.Sequential(*layers, nn.Flatten())
        hidden = tuple(hidden)
        dense = channels[-1] * h * w
        body: list[nn.Module] = []
        if hidden:
            body = [*mlp(dense, hidden[:-1], hidden[-1], activation), ACTIVATIONS[activation]()]
        self.head = nn.Sequential(*body, family.amortized_head(hidden[-1] if hidden else dense))

    def forward(self, x: Tensor) -> Tensor:
        x = flat_data(x, self.data_dim, "ConvEncoder")
        return self.head(self.conv(x.reshape(-1, 1, *self.image_shape)))


class ConvDecoder(nn.Module):
    """p(x | z) for images: z -> a small feature map -> stride-2 transposed convolutions.

    ``likelihood="bernoulli"`` gives per-pixel logits; ``"gaussian"`` per-pixel means with
    a learned per-pixel scale. Like every decoder here it accepts z of shape
    ``(*batch, latent_dim)`` and returns a distribution over flat x with ``batch_shape``
    ``(*batch,)``.

    Example:
        >>> decoder = ConvDecoder(2, (8, 8), channels=(4, 8))
        >>> decoder(torch.zeros(5, 3, 2)).log_prob(torch.ones(3, 64)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        likelihood: str = "bernoulli",
        activation: str = "relu",
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")
        self.h, self.w = _check_shape(image_shape, channels, "ConvDecoder")
        self.likelihood, self.latent_dim = likelihood, latent_dim
        self.image_shape = tuple(image_shape)
        self.data_dim = math.prod(self.image_shape)
        self.top = channels[-1]
        self.dense = nn.Sequential(
            nn.Linear(latent_dim, self.top * self.h * self.w), ACTIVATIONS[activation]()
        )
        layers: list[nn.Module] = []
        stages = list(reversed(channels))  # e.g. 64 -> 32 -> 1
        for i, (c_in, c_out) in enumerate(zip(stages, [*stages[1:], 1], strict=True)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(stages) - 1:
                layers.append(ACTIVATIONS[activation]())
        self.deconv = nn.Sequential(*layers)
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(self.data_dim))

    def forward(self, z: Tensor) -> Distribution:
        batch = z.shape[:-1]
        features = self.dense(z.reshape(-1, self.latent_dim))
        out = self.deconv(features.reshape(-1, self.top, self.h, self.w))
        out = out.reshape(*batch, self.data_dim)
        if self.likelihood == "bernoulli":
            return Independent(LogitBernoulli(out), 1)
        return Independent(Normal(out, self.log_scale.exp(), validate_args=False), 1)
