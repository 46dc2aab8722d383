"""The Gaussian families: a diagonal and a full-covariance q(z; lambda)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from .base import MEAN_STEP, VariationalFamily, gaussian_step_scale

__all__ = ["DiagonalGaussian", "FullCovarianceGaussian"]


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
