"""The generative model p(x, z) = p(z) p(x | z) that every inference route is measured on."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

__all__ = ["LatentVariableModel"]


class LatentVariableModel(nn.Module):
    r"""A latent-variable model with prior p(z) and likelihood p(x | z) = decoder(z).

    Arguments:
        decoder: an ``nn.Module`` taking z of shape ``(*batch, latent_dim)`` and returning a
            ``torch.distributions.Distribution`` with ``batch_shape == (*batch,)`` whose
            ``log_prob(x)`` gives one number per datapoint.
        latent_dim: dimension of z.
        prior: a distribution over z with ``event_shape == (latent_dim,)``; the standard
            Normal N(0, I) by default (kept as buffers, so ``model.to(device)`` moves it).

    Shapes follow one convention everywhere: samples first, then batch, then event.
    ``x`` is ``(batch, *data_shape)``, ``z`` is ``(samples, batch, latent_dim)`` or
    ``(batch, latent_dim)``, and log-densities have the shape of z without its last axis.

    Example:
        >>> from amortized.nets.decoders import BernoulliMLPDecoder
        >>> model = LatentVariableModel(BernoulliMLPDecoder(2, 5, hidden=(8,)), latent_dim=2)
        >>> x = torch.ones(3, 5)
        >>> model.log_joint(x, torch.zeros(10, 3, 2)).shape
        torch.Size([10, 3])
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, prior: Distribution | None = None):
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))
        if prior is not None and tuple(prior.event_shape) != (latent_dim,):
            raise ValueError(
                f"prior must have event_shape ({latent_dim},), got {tuple(prior.event_shape)}"
            )
        self._custom_prior = prior

    @property
    def prior(self) -> Distribution:
        """p(z)."""
        if self._custom_prior is not None:
            return self._custom_prior
        return Independent(Normal(self.prior_loc, self.prior_scale, validate_args=False), 1)

    def likelihood(self, z: Tensor) -> Distribution:
        """p(x | z) with ``batch_shape == z.shape[:-1]``."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must end in latent_dim={self.latent_dim}, got {tuple(z.shape)}")
        px = self.decoder(z)
        if not isinstance(px, Distribution):
            raise TypeError(
                "decoder(z) must return a torch.distributions.Distribution, "
                f"got {type(px).__name__}"
            )
        if tuple(px.batch_shape) != tuple(z.shape[:-1]):
            raise ValueError(
                f"decoder(z) returned batch_shape {tuple(px.batch_shape)} for z of shape "
                f"{tuple(z.shape)}; expected {tuple(z.shape[:-1])}. Wrap elementwise "
                "likelihoods in torch.distributions.Independent(..., 1) and let the decoder "
                "accept any leading batch dimensions"
            )
        return px

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z): x ``(batch, *data_shape)``, z ``([samples,] batch, D)`` -> z.shape[:-1]."""
        px = self.likelihood(z)
        event = tuple(px.event_shape)
        if tuple(x.shape[1:]) != event:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the decoder models datapoints of shape "
                f"{event}; reshape x to (batch, {', '.join(map(str, event))})"
            )
        return px.log_prob(x)  # x broadcasts over the sample axis

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(z) + log p(x | z), shape ``z.shape[:-1]``."""
        return self.log_likelihood(x, z) + self.prior.log_prob(z)  # checks z first

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """Draw n datapoints x ~ p(x) (or E[x | z] with ``mean=True``): ``(n, *data_shape)``."""
        z = self.prior.sample((n,))  # (n, D)
        px = self.likelihood(z)
        return px.mean if mean else px.sample()
