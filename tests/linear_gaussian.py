"""The linear-Gaussian model p(z) = N(0, I), p(x | z) = N(Wz + b, s^2 I) and its closed forms.

Every estimator is held against these: exact log p(x), the exact posterior N(m, S) with
precision Lambda = I + W^T W / s^2, and the best diagonal Gaussian (mean m, variances
1 / Lambda_ii), whose approximation gap is 1/2 (sum_i log Lambda_ii - log det Lambda).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from amortized import LatentVariableModel


class LinearGaussianDecoder(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (data_dim, latent_dim)
        self.bias = nn.Parameter(bias)  # (data_dim,)
        self.scale = scale

    def forward(self, z):
        return Independent(Normal(z @ self.weight.T + self.bias, self.scale), 1)


class LinearGaussian:
    def __init__(
        self, data_dim=6, latent_dim=3, scale=0.7, seed=0, dtype=torch.float64, weight_scale=0.8
    ):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(data_dim, latent_dim, generator=g, dtype=dtype) * weight_scale
        self.b = torch.randn(data_dim, generator=g, dtype=dtype) * 0.3
        self._build(scale)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor, scale: float):
        """The model with W ``(data_dim, latent_dim)``, b and noise scale s given."""
        self = cls.__new__(cls)
        self.W, self.b = weight.clone(), bias.clone()
        self._build(scale)
        return self

    def _build(self, scale):
        dtype, latent_dim = self.W.dtype, self.W.shape[1]
        self.s = scale
        self.latent_dim = latent_dim
        self.model = LatentVariableModel(
            LinearGaussianDecoder(self.W.clone(), self.b.clone(), scale), latent_dim
        ).to(dtype)
        self.precision = torch.eye(latent_dim, dtype=dtype) + self.W.T @ self.W / scale**2

    def sample_x(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g, dtype=self.W.dtype)
        noise = torch.randn(n, self.W.shape[0], generator=g, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.s * noise

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):
        cov = torch.linalg.inv(self.precision)
        mean = (x - self.b) @ self.W @ cov.T / self.s**2  # (n, latent_dim)
        return mean, cov

    def diagonal_gap(self):
        diag = torch.diagonal(self.precision).log().sum()
        return 0.5 * float(diag - torch.logdet(self.precision))

    def best_diagonal_elbo(self, x):
        return self.log_px(x) - self.diagonal_gap()
