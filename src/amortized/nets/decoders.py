"""Ready-made decoders: networks that map z to a distribution p(x | z) over flat data.

Any ``nn.Module`` can be a decoder of :class:`amortized.LatentVariableModel` as long as
``decoder(z)`` takes z of shape ``(*batch, latent_dim)`` and returns a
``torch.distributions.Distribution`` with ``batch_shape == (*batch,)`` whose
``log_prob(x)`` sums over the data dimensions (wrap elementwise likelihoods in
``Independent(..., 1)``). The two below are the MLP decoders of Kingma & Welling (2014)
and Burda, Grosse & Salakhutdinov (2016).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from .layers import mlp

__all__ = ["BernoulliMLPDecoder", "GaussianMLPDecoder", "DECODERS", "LogitBernoulli"]


class LogitBernoulli(Bernoulli):
    """``Bernoulli(logits=...)`` whose ``log_prob`` is ``x * logits - softplus(logits)``.

    The same density as ``torch.distributions.Bernoulli``, computed in two fused passes
    instead of the generic binary cross-entropy: the likelihood is most of the cost of
    every bound on image data (measured in ``benchmarks/``). Broadcasting x against
    logits with extra leading sample dimensions costs no copy.
    """

    def __init__(self, logits: Tensor):
        super().__init__(logits=logits, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        return value * self.logits - F.softplus(self.logits)


class BernoulliMLPDecoder(nn.Module):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(f(z)_d)) with an MLP f, for binary data.

    Example:
        >>> decoder = BernoulliMLPDecoder(latent_dim=2, data_dim=5, hidden=(8,))
        >>> decoder(torch.zeros(3, 2)).log_prob(torch.ones(3, 5)).shape
        torch.Size([3])
    """

    likelihood = "bernoulli"

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ):
        super().__init__()
        self.net = mlp(latent_dim, hidden, data_dim, activation)

    def forward(self, z: Tensor) -> Distribution:
        logits = self.net(z)  # (*batch, data_dim)
        # Data are checked once where they enter (amortized.data.check_data), not on every call.
        return Independent(LogitBernoulli(logits), 1)


class GaussianMLPDecoder(nn.Module):
    """p(x | z) = N(x; f(z), diag(sigma^2)) with an MLP mean and a learned per-dimension sigma.

    Pass ``scale`` to fix sigma instead of learning it.

    Example:
        >>> decoder = GaussianMLPDecoder(latent_dim=2, data_dim=5, hidden=(8,), scale=0.1)
        >>> decoder(torch.zeros(4, 3, 2)).batch_shape
        torch.Size([4, 3])
    """

    likelihood = "gaussian"

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        scale: float | None = None,
    ):
        super().__init__()
        self.net = mlp(latent_dim, hidden, data_dim, activation)
        if scale is None:
            self.log_scale = nn.Parameter(torch.zeros(data_dim))
        else:
            if scale <= 0:
                raise ValueError(f"scale must be positive, got {scale}")
            self.register_buffer("log_scale", torch.full((data_dim,), float(scale)).log())

    def forward(self, z: Tensor) -> Distribution:
        loc = self.net(z)  # (*batch, data_dim)
        return Independent(Normal(loc, self.log_scale.exp(), validate_args=False), 1)


#: Likelihood name -> decoder class, used by configs and the command line.
DECODERS: dict[str, type[nn.Module]] = {
    "bernoulli": BernoulliMLPDecoder,
    "gaussian": GaussianMLPDecoder,
}
