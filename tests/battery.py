"""A battery of closed-form linear-Gaussian models spanning the regimes q* must handle.

Every optimiser and estimator of lambda is held against all of them, from the prior start
and with default settings: broad posteriors, peaked ones (standard deviations near 1e-2
and 1e-3), strongly correlated ones (the diagonal family's gap is over 1 nat), posteriors
that stay near the prior, and a wider model whose posterior scales span three decades.
Each model carries its data; the closed forms (exact log p(x), the exact posterior, the
best diagonal Gaussian) come from :class:`linear_gaussian.LinearGaussian`.
"""

from __future__ import annotations

import torch
from linear_gaussian import LinearGaussian

DTYPE = torch.float64


def _correlated(seed: int) -> LinearGaussian:
    """Two latents seen almost only through their sum: posterior correlation near -0.95."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 1, generator=g, dtype=DTYPE)
    weight = torch.cat([w, w + 0.07 * torch.randn(5, 1, generator=g, dtype=DTYPE)], dim=1)
    return LinearGaussian.from_weights(weight, torch.zeros(5, dtype=DTYPE), scale=0.3)


def _mixed_scales(seed: int) -> LinearGaussian:
    """Ten latents whose columns of W span three decades: posterior SDs from ~1 to ~1e-3."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(30, 10, generator=g, dtype=DTYPE) * 0.3
    weight = weight * torch.logspace(-1, 2, 10, dtype=DTYPE)  # column scales
    bias = torch.randn(30, generator=g, dtype=DTYPE)
    return LinearGaussian.from_weights(weight, bias, scale=0.5)


def battery(n: int = 20) -> dict[str, tuple[LinearGaussian, torch.Tensor]]:
    """Name -> (model, data ``(n, data_dim)`` drawn from it)."""
    models = {
        "broad": LinearGaussian(data_dim=6, latent_dim=3, scale=1.0, seed=2),
        "peaked": LinearGaussian(data_dim=8, latent_dim=4, scale=0.015, seed=3),
        "very-peaked": LinearGaussian(data_dim=10, latent_dim=2, scale=0.003, seed=4),
        "correlated": _correlated(5),
        "near-prior": LinearGaussian(
            data_dim=6, latent_dim=3, scale=1.0, seed=6, weight_scale=0.05
        ),
        "mixed-scales": _mixed_scales(7),
    }
    return {name: (lg, lg.sample_x(n, seed=11)) for name, lg in models.items()}


def describe(lg: LinearGaussian) -> str:
    """Posterior SD range, strongest correlation and the diagonal family's gap."""
    _, cov = lg.posterior(torch.zeros(1, lg.W.shape[0], dtype=lg.W.dtype))
    sd = cov.diagonal().sqrt()
    corr = cov / (sd[:, None] * sd[None, :])
    off = (corr - torch.eye(len(sd), dtype=corr.dtype)).abs().max()
    return (f"D={lg.latent_dim}, posterior SD {float(sd.min()):.1e}..{float(sd.max()):.1e}, "
            f"max |corr| {float(off):.2f}, diagonal gap {lg.diagonal_gap():.3f}")  # fmt: skip


def exact_elbo(lg: LinearGaussian, q, x: torch.Tensor) -> torch.Tensor:
    """L[q] = log p(x) - KL(q || p(z | x)) in closed form for a Gaussian q, ``(n,)``."""
    mean, cov = lg.posterior(x)
    posterior = torch.distributions.MultivariateNormal(mean, cov)
    if isinstance(q, torch.distributions.Independent):  # diagonal: view as an MVN
        q = torch.distributions.MultivariateNormal(
            q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale)
        )
    return lg.log_px(x) - torch.distributions.kl_divergence(q, posterior)


