"""log p(x) on a nonlinear model against its exact value from a dense grid.

Two latents and a tanh-MLP Bernoulli decoder (:mod:`nonlinear`): the posteriors are
curved and skewed, nothing like the Gaussians of the linear models. IWAE, AIS and the gap
report's log p(x) must land within 0.05 nats of the exact mean, and no lower bound the
report states (L[q], L[q*] of every family, IWAE, AIS) may lie above it.
"""

from __future__ import annotations

import pytest
import torch
from nonlinear import NonlinearBernoulli
from torch import nn

from amortized import DiagonalGaussian, FullCovarianceGaussian, ais, fit_local, gap_report
from amortized.estimators import iwae_estimate

pytestmark = pytest.mark.usefixtures("single_thread")


class _PriorEncoder(nn.Module):
    """x -> the parameters of the prior N(0, I) in the diagonal family: the worst encoder."""

    def forward(self, x):
        return x.new_zeros(x.shape[0], 4)


@pytest.fixture(scope="module")
def setup(single_thread):
    m = NonlinearBernoulli(weight_scale=1.5)
    x = m.sample_x(40)
    exact = m.log_px(x, points=401)
    with pytest.warns(UserWarning):  # heavy-tailed weights from the Gaussian q* are flagged
        report = gap_report(m.model, x, _PriorEncoder(), DiagonalGaussian(2),
                            families=[FullCovarianceGaussian(2)], iwae_k=5000,
                            ais_steps=200, seed=0)  # fmt: skip
    return m, x, exact, report


def test_the_grid_is_exact():
    m = NonlinearBernoulli(weight_scale=1.5)
    x = m.sample_x(4)
    coarse, fine = m.log_px(x, points=401), m.log_px(x, points=801)
    wider = m.log_px(x, half_width=9.0, points=515)
    assert (coarse - fine).abs().max() < 1e-6
    assert (coarse - wider).abs().max() < 1e-6


def test_the_report_s_log_px_matches_the_exact_value_and_bounds_stay_below(setup):
    _, _, exact, report = setup
    truth = float(exact.mean())
    assert abs(report.log_px.mean - truth) < 0.05
    for name, q in report.log_px_estimates.items():
        assert abs(q.mean - truth) < 0.05, name
    bounds = {
        "L[q]": report.elbo_amortized,
        **{f"L[q*] {name}": q for name, q in report.elbo_local.items()},
        **{f"log p(x) by {name}": q for name, q in report.log_px_estimates.items()},
    }
    for name, q in bounds.items():
        assert q.mean < truth + 3 * q.mc_se, name
    # Gaussian q* leave heavy-tailed weights here: IWAE's rows are flagged, and AIS's 16
    # chains are too few to judge, which the report says
    assert report.log_px_weights["iwae"]["above"] > 0 and report.tail_warnings()
    assert "ais: 16 chains per row, too few to judge their weights' tail" in report.convergence()
    # the posteriors are not Gaussian: even the full-covariance family has a gap
    assert report.approximation_gap["fullcov"].mean > 0.05
    assert report.approximation_gap["diagonal"].mean > report.approximation_gap["fullcov"].mean


def test_iwae_and_ais_from_a_fitted_q_star_match_exact(setup):
    m, x, exact, _ = setup
    family = FullCovarianceGaussian(2)
    torch.manual_seed(3)
    lam = fit_local(m.model, family, x).lam
    iwae = iwae_estimate(m.model, family, lam, x, k=5000)
    forward = ais(m.model, x, family, lam, steps=200, chains=16)
    for name, est in (("iwae", iwae.log_px), ("ais", forward.log_px)):
        error = est - exact
        assert abs(float(error.mean())) < 0.05, name
        assert float(error.mean()) < 3 * float(iwae.stderr.square().sum().sqrt()) / len(x) + 0.01
    # a Gaussian q* of these curved posteriors leaves heavy-tailed weights, and k-hat says
    # so on most rows (median 0.76 to 0.90 over fits of seeds 3 to 8). Which rows are
    # estimated worst it does not tell reliably: over those seeds, the rows furthest from
    # the exact value have k-hat from 0.3 to 1.6, so no row-level claim is made.
    assert float(iwae.khat.median()) > 0.7
