r"""Autoregressive decoders for binary data: p(x | z) = prod_i Bernoulli(x_i | x_<i, z).

Such a decoder can model x well with no help from z, which is what makes posterior
collapse likely (Bowman et al. 2016; Chen et al. 2017): the KL term then pulls q(z | x)
onto the prior. Two networks compute the logits: the gated PixelCNN of
:mod:`amortized.nets.pixelcnn` (convolutional, for images) and :class:`MADEDecoder` here, a
masked MLP (Germain et al. 2015, "MADE") conditioned on z, which sees every earlier pixel
at the cost of an MLP and so reproduces collapse on a CPU in minutes.

Any network with ``logits(x, z)``, ``latent_dim`` and ``data_dim`` gives its
:class:`AutoregressiveBernoulli`: every logit from one pass over x (teacher forcing),
samples one dimension at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints
from zuko.nn import MaskedLinear

from .layers import ACTIVATIONS

__all__ = ["AutoregressiveBernoulli", "MADEDecoder", "WithoutLatent"]


class AutoregressiveBernoulli(Distribution):
    """p(x | z) of an autoregressive decoder, one x per z.

    ``log_prob`` scores all dimensions in one pass (logit i depends on x_<i only);
    ``sample`` draws them one at a time, ``data_dim`` passes. There is no closed-form
    mean: ``mean`` raises, sample instead.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, decoder: nn.Module, z: Tensor):
        self.decoder, self.z = decoder, z
        super().__init__(z.shape[:-1], torch.Size([decoder.data_dim]), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        d, dim = self.decoder.latent_dim, self.decoder.data_dim
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        x = value.expand(*shape, dim).reshape(-1, dim)
        logits = self.decoder.logits(x, self.z.expand(*shape, d).reshape(-1, d))
        return (x * logits - F.softplus(logits)).sum(-1).reshape(shape)

    @torch.no_grad()
    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        d, dim = self.decoder.latent_dim, self.decoder.data_dim
        z = self.z.expand(*shape, d).reshape(-1, d)
        x = z.new_zeros(z.shape[0], dim)
        for i in range(dim):
            x[:, i] = torch.bernoulli(torch.sigmoid(self.decoder.logits(x, z)[:, i]))
        return x.reshape(*shape, dim)

    @property
    def mean(self) -> Tensor:
        raise NotImplementedError("an autoregressive p(x | z) has no closed-form mean; sample")


class MADEDecoder(nn.Module):
    """A masked MLP conditioned on z: logit i sees x_<i (in the data's order) and all of z.

    Every hidden unit k gets a degree m_k in [0, data_dim - 1], spread evenly, and sees
    the inputs x_j with j < m_k and z; the output for x_i sees the units with m_k <= i
    and, through a direct masked linear connection, every x_j with j < i (Germain et al.
    2015). The masks are ``zuko.nn.MaskedLinear`` adjacencies.

    Example:
        >>> decoder = MADEDecoder(latent_dim=2, data_dim=5, hidden=(8,))
        >>> decoder(torch.zeros(3, 2)).log_prob(torch.ones(3, 5)).shape
        torch.Size([3])
    """

    likelihood = "bernoulli"

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        hidden: Sequence[int] = (500,),
        activation: str = "relu",
    ):
        super().__init__()
        if data_dim < 1 or latent_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError(
                f"MADEDecoder needs data_dim, latent_dim and hidden sizes >= 1, got "
                f"{data_dim}, {latent_dim}, {tuple(hidden)}"
            )
        self.latent_dim, self.data_dim = latent_dim, data_dim
        # Input j of x has degree j + 1, z has degree 0: a unit of degree m sees degree <= m.
        in_degree = torch.cat([torch.arange(1, data_dim + 1), torch.zeros(latent_dim)])
        layers: list[nn.Module] = []
        previous = in_degree
        for size in hidden:
            degree = torch.arange(size) * data_dim // size  # 0 .. data_dim - 1, evenly
            layers += [MaskedLinear(degree[:, None] >= previous), ACTIVATIONS[activation]()]
            previous = degree
        out_degree = torch.arange(data_dim)  # output i: units and inputs of degree <= i
        layers.append(MaskedLinear(out_degree[:, None] >= previous))
        self.net = nn.Sequential(*layers)
        pixels = torch.arange(data_dim)
        self.direct = MaskedLinear(pixels[:, None] > pixels, bias=False)

    def logits(self, x: Tensor, z: Tensor) -> Tensor:
        """Logit of every x_i given x_<i and z: x ``(n, data_dim)``, z ``(n, latent_dim)``."""
        return self.net(torch.cat([x, z], -1)) + self.direct(x)

    def forward(self, z: Tensor) -> AutoregressiveBernoulli:
        return AutoregressiveBernoulli(self, z)


class WithoutLatent(nn.Module):
    """An autoregressive decoder that ignores z: the fully collapsed model, as a reference.

    ``logits(x, z)`` is the wrapped network's with z set to zero, so p(x | z) = p(x) and
    the best q(z | x) is the prior. Trained as a VAE, it measures what the latent code
    buys: the gap between its log-likelihood and a z-conditioned decoder's.

    Example:
        >>> decoder = WithoutLatent(MADEDecoder(latent_dim=2, data_dim=5, hidden=(8,)))
        >>> x = torch.ones(3, 5)
        >>> a, b = decoder(torch.zeros(3, 2)).log_prob(x), decoder(torch.ones(3, 2)).log_prob(x)
        >>> torch.equal(a, b)
        True
    """

    likelihood = "bernoulli"

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.latent_dim, self.data_dim = network.latent_dim, network.data_dim

    def logits(self, x: Tensor, z: Tensor) -> Tensor:
        return self.network.logits(x, torch.zeros_like(z))

    def forward(self, z: Tensor) -> AutoregressiveBernoulli:
        return AutoregressiveBernoulli(self, z)
