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
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

__all__ = ["VariationalFamily", "DiagonalGaussian", "FullCovarianceGaussian"]

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

        :class:`amortized.optimiser.LambdaOptimiser` takes Adam steps in units of these
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


class DiagonalGaussian(VariationalFamily):
    r"""Fully factorized Gaussian, q(z; lam) = N(mu, diag(sigma^2)).

    ``lam = [mu, log sigma]``, so ``num_params = 2 * latent_dim``. This is the
    family of the standard VAE (Kingma & Welling 2014) and the FFG of Cremer,
    Li & Duvenaud (2018).

    Example:
        >>> family = DiagonalGaussian(2)
        >>> lam = family.prior_init(3)
        >>> family.distribution(lam).rsample((5,)).shape
        torch.Size([5, 3, 2])
    """

    name = "diagonal"

    @property
    def num_params(self) -> int:
        return 2 * self.latent_dim

    def _distribution(self, lam: Tensor) -> Distribution:
        loc, log_scale = lam.split(self.latent_dim, dim=-1)  # (batch, D) each
        return Independent(Normal(loc, log_scale.exp(), validate_args=False), 1)

    def prior_init(self, batch: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, self.num_params, device=device, dtype=dtype)

    def mean(self, lam: Tensor) -> Tensor:
        return lam[..., : self.latent_dim]

    def step_scale(self, lam: Tensor) -> Tensor:
        return gaussian_step_scale(lam, self.latent_dim)

    def from_gaussian(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        return torch.cat([loc, log_scale], dim=-1)

    def gaussian_moments(self, lam: Tensor, samples: int = 256) -> tuple[Tensor, Tensor]:
        loc, log_scale = lam.split(self.latent_dim, dim=-1)
        return loc, log_scale


class FullCovarianceGaussian(VariationalFamily):
    r"""Gaussian with a full covariance, q(z; lam) = N(mu, L L^T).

    ``lam = [mu, log diag(L), strictly-lower entries of L]`` (row-major), so
    ``num_params = D + D(D+1)/2``. The Cholesky factor keeps the covariance
    positive definite for every real ``lam``. Because the family contains every
    Gaussian, it has no approximation gap on a linear-Gaussian model.

    Example:
        >>> family = FullCovarianceGaussian(2)
        >>> family.num_params
        5
        >>> family.distribution(family.prior_init(4)).covariance_matrix[0]
        tensor([[1., 0.],
                [0., 1.]])
    """

    name = "fullcov"

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self._rows, self._cols = rows, cols

    @property
    def num_params(self) -> int:
        d = self.latent_dim
        return d + d * (d + 1) // 2

    def scale_tril(self, lam: Tensor) -> Tensor:
        """Cholesky factor L, shape ``(batch, D, D)``."""
        d = self.latent_dim
        log_diag = lam[..., d : 2 * d]  # (batch, D)
        off = lam[..., 2 * d :]  # (batch, D(D-1)/2)
        strict = lam.new_zeros(*lam.shape[:-1], d, d)  # (batch, D, D)
        strict[..., self._rows.to(lam.device), self._cols.to(lam.device)] = off
        return strict + torch.diag_embed(log_diag.exp())

    def _distribution(self, lam: Tensor) -> Distribution:
        loc = lam[..., : self.latent_dim]
        return MultivariateNormal(loc, scale_tril=self.scale_tril(lam))

    def prior_init(self, batch: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, self.num_params, device=device, dtype=dtype)

    def mean(self, lam: Tensor) -> Tensor:
        return lam[..., : self.latent_dim]

    def step_scale(self, lam: Tensor) -> Tensor:
        """A mean moves in units of ``MEAN_STEP`` x its coordinate's standard deviation
        sd_i, a log diagonal entry of L in nats, and L_ij (row i) in units of sd_i, the
        spread that entry adds to z_i."""
        sd = self.scale_tril(lam).square().sum(-1).sqrt()  # (batch, D)
        rows = self._rows.to(lam.device)
        return torch.cat([MEAN_STEP * sd, torch.ones_like(sd), sd[..., rows]], dim=-1)

    def from_gaussian(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        off = loc.new_zeros(*loc.shape[:-1], self.num_params - 2 * self.latent_dim)
        return torch.cat([loc, log_scale, off], dim=-1)

    def gaussian_moments(self, lam: Tensor, samples: int = 256) -> tuple[Tensor, Tensor]:
        """Exact: the mean and the log of sqrt(diag(L L^T))."""
        variance = self.scale_tril(lam).square().sum(-1)  # (batch, D): rows of L
        return self.mean(lam), 0.5 * variance.log()

    @staticmethod
    def params_from(loc: Tensor, scale_tril: Tensor) -> Tensor:
        """Inverse of :meth:`distribution`: ``lam`` from a mean and a Cholesky factor."""
        d = loc.shape[-1]
        rows, cols = torch.tril_indices(d, d, offset=-1, device=loc.device)
        log_diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log()
        return torch.cat([loc, log_diag, scale_tril[..., rows, cols]], dim=-1)
