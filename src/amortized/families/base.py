r"""Variational families q(z; lambda) with one parameter row per datapoint.

A family is a recipe that turns a parameter tensor ``lam`` of shape
``(batch, family.num_params)`` into a ``torch.distributions.Distribution`` over z
with ``batch_shape == (batch,)`` and ``event_shape == (latent_dim,)``. The
parameters are plain, unconstrained real numbers, so the same ``lam`` can be

* computed by an encoder network, ``lam = encoder(x)`` (amortized inference),
* optimised freely per datapoint, ``lam_i <- lam_i + lr * grad ELBO_i``
  (classical VI, :func:`amortized.fit_local`),
* or started at ``encoder(x)`` and improved (semi-amortized and iterative inference).

Families hold no learnable state of their own: everything that varies across
datapoints lives in ``lam``. A family may still let an encoder share some entries of
``lam`` across datapoints (:meth:`VariationalFamily.amortized_head`), as an inverse
autoregressive flow shares its network weights; per datapoint, those entries are free too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

__all__ = ["VariationalFamily", "MEAN_STEP", "gaussian_step_scale"]

#: How far an optimiser step may move a mean, relative to the step of a log scale and in
#: units of q's standard deviation. From the prior start q narrows at about lr nats per
#: step while its mean moves MEAN_STEP * lr * sigma, so a mean travels up to MEAN_STEP
#: prior standard deviations before q is as narrow as the posterior (benchmarks/battery.py:
#: 2.5 and 5 both reach every optimum of the battery; 1 leaves peaked posteriors
#: hundreds of nats short).
MEAN_STEP = 5.0


def gaussian_step_scale(lam: Tensor, latent_dim: int) -> Tensor:
    """Step lengths of ``[mu, log sigma]``: ``MEAN_STEP * sigma`` and 1, ``(batch, 2D)``."""
    sigma = lam[..., latent_dim : 2 * latent_dim].exp()
    return torch.cat([MEAN_STEP * sigma, torch.ones_like(sigma)], dim=-1)


class VariationalFamily(ABC):
    """Interface: a map from unconstrained parameters ``lam`` to a distribution over z."""

    #: Short name used in reports and configs.
    name: str = "family"
    #: :func:`amortized.fit_local`'s steps between checks of progress: long enough for a
    #: window to show what this family's steps gain (a flow's weights move its ELBO
    #: slowly, so a flow checks less often).
    check_every: int = 50
    #: Whether log q(z; lam) at an arbitrary z costs about one pass (a flow's inverse can
    #: take one pass per latent dimension). Estimates that score every draw under every
    #: row, such as the latent diagnostics' I(x; z), use fewer rows where it does not.
    cheap_density: bool = True

    def __init__(self, latent_dim: int):
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = latent_dim

    @property
    @abstractmethod
    def num_params(self) -> int:
        """Length of one datapoint's parameter vector lambda."""

    @abstractmethod
    def _distribution(self, lam: Tensor) -> Distribution:
        """Build q(z; lam) from parameters already checked by :meth:`distribution`."""

    @abstractmethod
    def prior_init(self, batch: int, device=None, dtype=None) -> Tensor:
        """Parameters that make q equal to the standard Normal prior: ``(batch, num_params)``."""

    def distribution(self, lam: Tensor) -> Distribution:
        """q(z; lam) with ``batch_shape == lam.shape[:-1]`` and ``event_shape == (latent_dim,)``."""
        if not isinstance(lam, Tensor):
            raise TypeError(f"{self.name}: lam must be a torch.Tensor, got {type(lam).__name__}")
        if lam.dim() < 1 or lam.shape[-1] != self.num_params:
            raise ValueError(
                f"{self.name}: lam must have shape (batch, {self.num_params}), "
                f"got {tuple(lam.shape)}"
            )
        return self._distribution(lam)

    def mean(self, lam: Tensor) -> Tensor:
        """E_q[z], shape ``(batch, latent_dim)``."""
        return self.distribution(lam).mean

    def lr_scale(self, device=None, dtype=None) -> Tensor | None:
        """Per-entry scale of :func:`amortized.fit_local`'s learning rate, ``(num_params,)``.

        ``None`` (the default) means 1 for every entry. Adam's step size suits a
        Gaussian's parameters; a flow whose lam holds network weights moves those in
        smaller steps.
        """
        return None

    def step_scale(self, lam: Tensor) -> Tensor | None:
        """Each entry's natural length at lam, ``(batch, num_params)``, for the optimiser.

        :class:`amortized.inference.optimiser.LambdaOptimiser` takes Adam steps in units of these
        lengths, so its steps follow the current q's scale. ``None`` means 1 for every
        entry; by default this is :meth:`lr_scale`, the same at every lam.
        """
        scale = self.lr_scale(lam.device, lam.dtype)
        return None if scale is None else scale.expand_as(lam)

    def from_gaussian(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        """Parameters of the member of this family nearest N(loc, diag(exp(log_scale))^2).

        Every family here contains the diagonal Gaussians, so this is exact; it warm-starts
        one family's optimisation from another's result. ``loc`` and ``log_scale`` are
        ``(batch, latent_dim)``.
        """
        raise NotImplementedError(f"{self.name} cannot start from a Gaussian")

    def gaussian_moments(self, lam: Tensor, samples: int = 256) -> tuple[Tensor, Tensor]:
        """Mean and log standard deviation of every coordinate of q(z; lam), by sampling.

        Returns two ``(batch, latent_dim)`` tensors; with :meth:`from_gaussian` of another
        family this moment-matches q into that family.
        """
        with torch.no_grad():
            z = self.distribution(lam).sample((samples,))  # (samples, batch, D)
            return z.mean(0), z.std(0).clamp_min(1e-6).log()

    def amortized_head(self, in_features: int) -> nn.Module:
        """An encoder's last layer: features ``(batch, in_features)`` -> ``lam``.

        By default a linear map to every entry of ``lam``. A family whose ``lam`` holds
        weights (a flow's networks) overrides this to share those weights across
        datapoints and compute only a per-datapoint part from the features.
        """
        return nn.Linear(in_features, self.num_params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(latent_dim={self.latent_dim})"
