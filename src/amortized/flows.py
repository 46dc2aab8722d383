r"""Normalizing-flow families: a diagonal Gaussian pushed through invertible maps.

Every parameter of the flow lives in the per-datapoint vector lambda, so a flow family
is used exactly like the Gaussian ones: an encoder can output lambda (amortized), and
:func:`amortized.fit_local` can free lambda_i (per-datapoint), with no shared state.

The transforms are ``torch.distributions.Transform`` objects whose parameters carry a
batch dimension, so one transform holds a different flow for every datapoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Independent, Normal, Transform, TransformedDistribution, constraints

from .families import VariationalFamily

__all__ = ["PlanarTransform", "PlanarFlow"]

#: softplus(a) = 1 at a = log(e - 1): the planar map with u = LOG_E_MINUS_1 * w / |w|^2 is
#: the identity, which gives the flow its prior initialisation.
LOG_E_MINUS_1 = math.log(math.e - 1)


class PlanarTransform(Transform):
    r"""Planar map f(z) = z + u_hat tanh(w^T z + b) (Rezende & Mohamed 2015), batched.

    ``u`` and ``w`` are ``(*batch, D)`` and ``b`` is ``(*batch,)``; z is
    ``(*sample, *batch, D)``. ``u_hat = u + (softplus(w^T u) - 1 - w^T u) w / |w|^2``
    keeps w^T u_hat >= -1, which makes the map invertible (Rezende & Mohamed, appendix A).
    The inverse solves the scalar equation w^T y = a + w^T u_hat tanh(a + b) for
    a = w^T z by bisection (it is monotone in a), then z = y - u_hat tanh(a + b).

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        https://arxiv.org/abs/1505.05770

    Example:
        >>> t = PlanarTransform(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3))
        >>> z = torch.randn(5, 3, 2)
        >>> torch.allclose(t.inv(t(z)), z, atol=1e-5)
        True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u: Tensor, w: Tensor, b: Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        wu = (w * u).sum(-1, keepdim=True)  # (*batch, 1)
        w_sq = w.square().sum(-1, keepdim=True).clamp_min(1e-12)
        self.u_hat = u + (F.softplus(wu) - 1 - wu) * w / w_sq  # (*batch, D)
        self.w, self.b = w, b

    def _call(self, z: Tensor) -> Tensor:
        a = (z * self.w).sum(-1) + self.b  # (*sample, *batch)
        return z + self.u_hat * torch.tanh(a)[..., None]

    def _inverse(self, y: Tensor) -> Tensor:
        c = (y * self.w).sum(-1)  # w^T y, (*sample, *batch)
        wu = (self.w * self.u_hat).sum(-1)  # >= -1
        lo, hi = c - wu.abs(), c + wu.abs()  # |tanh| <= 1 brackets the root
        for _ in range(64):  # bisection: the residual is increasing in a
            mid = (lo + hi) / 2
            above = mid + wu * torch.tanh(mid + self.b) > c
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        a = (lo + hi) / 2
        return y - self.u_hat * torch.tanh(a + self.b)[..., None]

    def log_abs_det_jacobian(self, z: Tensor, y: Tensor) -> Tensor:
        # det(I + u_hat psi^T) = 1 + psi^T u_hat with psi = (1 - tanh^2(a)) w.
        a = (z * self.w).sum(-1) + self.b
        wu = (self.w * self.u_hat).sum(-1)
        return torch.log(torch.abs(1 + (1 - torch.tanh(a).square()) * wu))


class PlanarFlow(VariationalFamily):
    r"""q(z; lam): N(mu, diag(sigma^2)) followed by ``layers`` planar maps, all per datapoint.

    ``lam = [mu, log sigma, (u_1, w_1, b_1), ..., (u_K, w_K, b_K)]``, so
    ``num_params = 2D + K (2D + 1)``. The prior initialisation makes every planar map the
    identity, so q starts at N(0, I).

    Example:
        >>> family = PlanarFlow(2, layers=3)
        >>> family.num_params
        19
        >>> q = family.distribution(family.prior_init(4))
        >>> q.rsample((5,)).shape
        torch.Size([5, 4, 2])
    """

    name = "planar"

    def __init__(self, latent_dim: int, layers: int = 4):
        super().__init__(latent_dim)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = layers

    @property
    def num_params(self) -> int:
        d = self.latent_dim
        return 2 * d + self.layers * (2 * d + 1)

    def transforms(self, lam: Tensor) -> list[PlanarTransform]:
        d = self.latent_dim
        out = []
        for k in range(self.layers):
            p = lam[..., 2 * d + k * (2 * d + 1) : 2 * d + (k + 1) * (2 * d + 1)]
            out.append(PlanarTransform(p[..., :d], p[..., d : 2 * d], p[..., 2 * d]))
        return out

    def _distribution(self, lam: Tensor) -> TransformedDistribution:
        d = self.latent_dim
        base = Independent(Normal(lam[..., :d], lam[..., d : 2 * d].exp()), 1)
        return TransformedDistribution(base, self.transforms(lam))

    def prior_init(self, batch: int, device=None, dtype=None) -> Tensor:
        d = self.latent_dim
        w = torch.ones(d, device=device, dtype=dtype) / math.sqrt(d)  # |w| = 1
        layer = torch.cat([LOG_E_MINUS_1 * w, w, w.new_zeros(1)])  # u, w, b: identity map
        lam = torch.cat([w.new_zeros(2 * d), layer.repeat(self.layers)])
        return lam.expand(batch, -1).clone()

    def mean(self, lam: Tensor) -> Tensor:
        """E_q[z] has no closed form; the flow applied to the base mean is returned."""
        z = lam[..., : self.latent_dim]
        for t in self.transforms(lam):
            z = t(z)
        return z

    def __repr__(self) -> str:
        return f"PlanarFlow(latent_dim={self.latent_dim}, layers={self.layers})"
