r"""An autoregressive decoder for binary images: a gated PixelCNN conditioned on z.

p(x | z) = prod_i Bernoulli(x_i | x_<i, z), pixels in raster order. Such a decoder can
model x well with no help from z, which is what makes posterior collapse likely (Bowman
et al. 2016; Chen et al. 2017): the KL term then pulls q(z | x) onto the prior.

The network is the gated PixelCNN of van den Oord et al. (2016), "Conditional Image
Generation with PixelCNN Decoders": a vertical stack whose output at row r sees the rows
<= r, a horizontal stack whose output at (r, c) sees row r's columns < c, the vertical
stack fed into the horizontal one shifted down by a row (so it sees rows < r), gated
activations tanh(a) * sigmoid(b), and z added to every gate through a linear map (global
conditioning). The two stacks together see every earlier pixel: no blind spot.
Causality comes from padding and shifting, not from masked weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoregressive import AutoregressiveBernoulli

__all__ = ["GatedPixelCNNDecoder"]


def _gate(pre: Tensor) -> Tensor:
    a, b = pre.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class _GatedLayer(nn.Module):
    def __init__(self, in_channels: int, channels: int, kernel: int, latent_dim: int, first: bool):
        super().__init__()
        self.kernel, self.first = kernel, first
        rows = kernel // 2 + 1  # the current row and kernel // 2 rows above
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (rows, kernel))
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, rows))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.condition = nn.Linear(latent_dim, 4 * channels)

    def forward(self, v: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        k, rows = self.kernel, self.kernel // 2 + 1
        v_pre = self.vertical(F.pad(v, (k // 2, k // 2, rows - 1, 0)))  # row r: rows <= r
        h_in = F.pad(h, (1, 0))[..., :-1] if self.first else h  # first layer: columns < c
        h_pre = self.horizontal(F.pad(h_in, (rows - 1, 0)))
        v_down = F.pad(v_pre, (0, 0, 1, 0))[..., :-1, :]  # row r now sees rows < r only
        h_pre = h_pre + self.vertical_to_horizontal(v_down)
        cv, ch = self.condition(z)[..., None, None].chunk(2, dim=1)
        v_out = _gate(v_pre + cv)
        h_out = self.horizontal_out(_gate(h_pre + ch))
        return v_out, h_out if self.first else h + h_out


class GatedPixelCNNDecoder(nn.Module):
    """p(x | z) for binary images, autoregressive over pixels: an ``AutoregressiveBernoulli``.

    Data are flat, ``(*batch, H * W)``, like every decoder here.

    Example:
        >>> decoder = GatedPixelCNNDecoder(latent_dim=2, image_shape=(4, 4), channels=8)
        >>> decoder(torch.zeros(3, 2)).log_prob(torch.ones(3, 16)).shape
        torch.Size([3])
    """

    likelihood = "bernoulli"

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        channels: int = 32,
        layers: int = 5,
        kernel: int = 5,
    ):
        super().__init__()
        if len(image_shape) != 2:
            raise ValueError(f"image_shape must be (height, width), got {tuple(image_shape)}")
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 3, got {kernel}")
        if layers < 1 or channels < 1:
            raise ValueError(f"layers and channels must be >= 1, got {layers}, {channels}")
        self.latent_dim, self.image_shape = latent_dim, tuple(image_shape)
        self.layers = nn.ModuleList(
            _GatedLayer(1 if i == 0 else channels, channels, kernel, latent_dim, first=i == 0)
            for i in range(layers)
        )
        self.out = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1)
        )

    @property
    def data_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def logits(self, x: Tensor, z: Tensor) -> Tensor:
        """Logit of every pixel given the pixels before it and z: x ``(n, H*W)``, z ``(n, D)``."""
        n = x.shape[0]
        image = x.reshape(n, 1, *self.image_shape)
        v = h = image
        for layer in self.layers:
            v, h = layer(v, h, z)
        return self.out(h).reshape(n, self.data_dim)

    def forward(self, z: Tensor) -> AutoregressiveBernoulli:
        return AutoregressiveBernoulli(self, z)
