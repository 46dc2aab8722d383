"""AIS and BDMC against the exact log p(x) of the linear-Gaussian model."""

from __future__ import annotations

import pytest
import torch
from linear_gaussian import LinearGaussian

from amortized import DiagonalGaussian, FullCovarianceGaussian
from amortized.measure.ais import ais, bdmc, reverse_ais, schedule


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_schedule_runs_from_zero_to_one_increasing(kind):
    betas = schedule(50, kind)
    assert betas.shape == (51,)
    assert betas[0] == 0 and betas[-1] == 1
    assert (betas.diff() > 0).all()
    with pytest.raises(ValueError):
        schedule(0)
    with pytest.raises(ValueError, match="schedule kind"):
        schedule(5, "cosine")


def test_ais_from_the_exact_posterior_is_exact():
    """With q = p(z|x), log p(x, z) - log q(z) = log p(x) for every z: no variance at all."""
    lg = LinearGaussian()
    x = lg.sample_x(20)
    mean, cov = lg.posterior(x)
    family = FullCovarianceGaussian(3)
    lam = family.params_from(mean, torch.linalg.cholesky(cov).expand(20, 3, 3))
    torch.manual_seed(0)
    result = ais(lg.model, x, family, lam, steps=5, chains=4)
    torch.testing.assert_close(result.log_px, lg.log_px(x), rtol=0, atol=1e-9)


def test_ais_from_the_prior_matches_exact_log_px():
    lg = LinearGaussian()
    x = lg.sample_x(60)
    torch.manual_seed(0)
    result = ais(lg.model, x, steps=400, chains=16)
    error = result.log_px - lg.log_px(x)
    assert abs(float(error.mean())) < 0.05
    assert 0.3 < float(result.acceptance.mean()) < 1.0
    assert float(result.stderr.mean()) < 0.2  # delta-method s.e. over 16 chains


def test_ais_from_a_good_encoder_needs_few_steps():
    lg = LinearGaussian()
    x = lg.sample_x(60)
    mean, _ = lg.posterior(x)
    scale = torch.diagonal(lg.precision).rsqrt().log().expand(60, 3)
    lam = torch.cat([mean, scale + 0.2], -1)  # best diagonal, slightly widened
    torch.manual_seed(0)
    result = ais(lg.model, x, DiagonalGaussian(3), lam, steps=50, chains=8)
    error = result.log_px - lg.log_px(x)
    assert abs(float(error.mean())) < 0.05
    assert float(error.abs().max()) < 0.2


def test_bdmc_sandwich_contains_the_truth_and_shrinks_with_longer_schedules():
    lg = LinearGaussian()
    gaps = []
    for steps in (10, 100, 400):
        torch.manual_seed(1)
        x, lower, upper = bdmc(lg.model, 30, steps=steps, chains=8)
        exact = lg.log_px(x)
        assert float((lower.log_px - exact).mean()) < 0.02  # a lower bound on average
        assert float((upper.log_px - exact).mean()) > -0.02  # an upper bound on average
        gaps.append(float((upper.log_px - lower.log_px).mean()))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.1


def test_bad_arguments():
    lg = LinearGaussian()
    x = lg.sample_x(3)
    family = DiagonalGaussian(3)
    with pytest.raises(ValueError, match="both family and lam"):
        ais(lg.model, x, family, None)
    with pytest.raises(ValueError, match="both family and lam"):
        reverse_ais(lg.model, x, torch.zeros(2, 3, 3), family, None)
    with pytest.raises(ValueError, match="chains"):
        ais(lg.model, x, chains=0)
    with pytest.raises(ValueError, match=r"z must be \(chains, 3, latent_dim\)"):
        reverse_ais(lg.model, x, torch.zeros(3, 3))
