"""The shared lambda optimiser on the closed-form battery, from the prior, with defaults.

Each model of ``tests/battery.py`` has a known diagonal optimum and a known posterior, so
L[q] of a fitted Gaussian is computed exactly (no Monte Carlo error in the check).
"""

from __future__ import annotations

import pytest
import torch
from battery import battery, exact_elbo

from amortized import DiagonalGaussian, FullCovarianceGaussian, fit_local

pytestmark = pytest.mark.usefixtures("single_thread")

BATTERY = battery()


@pytest.mark.parametrize("name", list(BATTERY))
def test_q_star_from_the_prior_with_defaults(name):
    lg, x = BATTERY[name]
    d = lg.latent_dim
    diagonal, full = DiagonalGaussian(d), FullCovarianceGaussian(d)
    torch.manual_seed(0)
    fit = fit_local(lg.model, diagonal, x)
    shortfall = lg.best_diagonal_elbo(x) - exact_elbo(lg, diagonal.distribution(fit.lam), x)
    assert float(shortfall.mean()) < 0.05, name
    assert float(shortfall.min()) > -1e-9  # nothing beats the optimum: the check is exact
    assert bool(fit.converged.all())
    fit = fit_local(lg.model, full, x)
    gap = lg.log_px(x) - exact_elbo(lg, full.distribution(fit.lam), x)
    assert abs(float(gap.mean())) < 0.05, name
    assert bool(fit.converged.all())
    # the certificate: a converged row has little left to gain, and the rows' estimates
    # are of the order of what they really lack
    assert float(fit.remaining.mean()) < 0.05


@pytest.mark.parametrize("name", ["peaked", "very-peaked"])
def test_a_row_started_at_the_optimum_never_ends_below_it(name, exact_posterior_lam):
    """The best iterate under common draws: started at the exact posterior (the optimum of
    the full-covariance family), the fit returns it or an iterate that its check draws
    cannot tell from it (a selection among near-equals: within 0.02 nats, twice tol)."""
    lg, x = BATTERY[name]
    family = FullCovarianceGaussian(lg.latent_dim)
    start = exact_posterior_lam(lg, x)
    torch.manual_seed(1)
    fit = fit_local(lg.model, family, x, start)
    loss = exact_elbo(lg, family.distribution(start), x) - exact_elbo(
        lg, family.distribution(fit.lam), x
    )
    assert float(loss.max()) < 0.02, name


@pytest.mark.parametrize("name", ["peaked", "very-peaked"])
def test_a_family_started_at_another_familys_optimum_never_ends_below_it(name):
    lg, x = BATTERY[name]
    d = lg.latent_dim
    diagonal, full = DiagonalGaussian(d), FullCovarianceGaussian(d)
    mean, _ = lg.posterior(x)
    log_scale = (-0.5 * torch.diagonal(lg.precision).log()).expand_as(mean)
    start = full.from_gaussian(mean, log_scale)  # the diagonal q*, inside the fullcov family
    torch.manual_seed(2)
    fit = fit_local(lg.model, full, x, start, steps=100)  # too few steps to reach q*
    before = exact_elbo(lg, diagonal.distribution(diagonal.from_gaussian(mean, log_scale)), x)
    after = exact_elbo(lg, full.distribution(fit.lam), x)
    assert float((before - after).max()) < 0.02, name
