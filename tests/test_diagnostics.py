"""Collapse diagnostics against hand-computed values: KL per dimension, active units, MI."""

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from amortized import DiagonalGaussian, FullCovarianceGaussian
from amortized.estimators import kl_to_prior
from amortized.measure.diagnostics import (
    active_units,
    collapse_warning,
    kl_per_dimension,
    latent_diagnostics,
    mutual_information,
)

PRIOR = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)


def test_kl_per_dimension_of_the_diagonal_gaussian_is_the_closed_form():
    family = DiagonalGaussian(3)
    mu = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 0.0]])
    log_sigma = torch.tensor([[0.0, 0.0, math.log(0.5)], [math.log(2.0), 0.0, 0.0]])
    kl = kl_per_dimension(family, torch.cat([mu, log_sigma], 1), PRIOR)
    sigma2 = (2 * log_sigma).exp()
    by_hand = 0.5 * (mu**2 + sigma2 - 1 - 2 * log_sigma)
    assert torch.allclose(kl, by_hand, atol=1e-6)
    assert kl[0, 0] == 0 and kl[0, 1] == pytest.approx(0.5)  # q = prior; a unit shift
    total = kl_to_prior(family.distribution(torch.cat([mu, log_sigma], 1)), PRIOR)
    assert torch.allclose(kl.sum(1), total, atol=1e-6)


def test_kl_per_dimension_of_the_full_covariance_gaussian_uses_its_marginals():
    family = FullCovarianceGaussian(3)
    loc = torch.tensor([[0.3, -1.0, 2.0]])
    tril = torch.tensor([[[1.0, 0, 0], [0.8, 0.5, 0], [-0.4, 0.3, 2.0]]])
    lam = FullCovarianceGaussian.params_from(loc, tril)
    variance = torch.diagonal(tril @ tril.transpose(-1, -2), dim1=-2, dim2=-1)
    by_hand = 0.5 * (loc**2 + variance - 1 - variance.log())
    assert torch.allclose(kl_per_dimension(family, lam, PRIOR), by_hand, atol=1e-5)
    # the sum of marginal KLs is below the joint KL (the gap is the total correlation)
    joint = kl_to_prior(MultivariateNormal(loc, scale_tril=tril), PRIOR)
    assert by_hand.sum() < joint


def test_per_dimension_kl_needs_a_factorized_normal_prior():
    prior = MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="factorized Normal prior"):
        kl_per_dimension(DiagonalGaussian(3), torch.zeros(2, 6), prior)


def test_active_units_of_a_known_linear_encoder():
    # Encoder mean mu(x) = x W with x in {(0,0), (1,0), (0,1), (1,1)}: the sample
    # variance of each unit's mean is computed by hand.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([[1.0, 0.0, 0.1, 0.0], [0.0, 0.2, 0.0, 0.0]])
    count, variances = active_units(x @ w)
    # column values: (0,1,0,1), (0,0,.2,.2), (0,.1,0,.1), 0: unbiased variances 1/3, .04/3, .01/3, 0
    assert torch.allclose(variances, torch.tensor([1 / 3, 0.04 / 3, 0.01 / 3, 0.0]), atol=1e-7)
    assert count == 2  # 0.0133 > 0.01 > 0.0033
    assert active_units(x @ w, threshold=0.001)[0] == 3
    with pytest.raises(ValueError, match="n >= 2"):
        active_units(torch.zeros(1, 4))


def test_mutual_information_is_zero_for_a_constant_encoder_and_log_n_for_disjoint_ones():
    family = DiagonalGaussian(2)
    same = torch.tensor([[0.3, -0.2, -1.0, 0.5]]).expand(50, 4)
    assert mutual_information(family, same, samples=3) == pytest.approx(0.0, abs=1e-5)
    apart = torch.cat([torch.arange(50.0).unsqueeze(1) * 100, torch.zeros(50, 1),
                       torch.full((50, 2), -2.0)], 1)  # fmt: skip
    assert mutual_information(family, apart) == pytest.approx(math.log(50), abs=1e-4)


def test_mutual_information_stays_exact_when_the_scales_are_tiny():
    # A collapsing encoder can shrink its scales to ~1e-18 around nearly equal means,
    # where expanded quadratic forms cancel: the estimate must stay 0 and log n there.
    family = DiagonalGaussian(3)
    tiny = torch.full((40, 3), -40.0)
    same = torch.cat([torch.tensor([[0.7, -1.3, 2.1]]).expand(40, 3), tiny], 1)
    assert mutual_information(family, same, samples=2) == pytest.approx(0.0, abs=1e-6)
    close = torch.cat([0.001 * torch.arange(40.0).unsqueeze(1).expand(40, 3) + 0.7, tiny], 1)
    assert active_units(close[:, :3])[0] == 0  # means too close to count as active
    assert mutual_information(family, close, samples=2) == pytest.approx(math.log(40), abs=1e-6)


def test_mutual_information_of_a_gaussian_channel():
    # x ~ N(0, 1), q(z | x) = N(x, 1): I(x; z) = 0.5 log 2 = 0.3466 nats.
    torch.manual_seed(0)
    family = DiagonalGaussian(1)
    x = torch.randn(4000, 1)
    lam = torch.cat([x, torch.zeros(4000, 1)], 1)
    assert mutual_information(family, lam, samples=4) == pytest.approx(0.5 * math.log(2), abs=0.03)
    # chunking does not change the estimate
    torch.manual_seed(1)
    small = mutual_information(family, lam[:300], samples=2, budget=1000)
    torch.manual_seed(1)
    large = mutual_information(family, lam[:300], samples=2)
    assert small == pytest.approx(large, abs=1e-5)


def test_diagnostics_of_a_collapsed_code_warn():
    family = DiagonalGaussian(3)
    collapsed = latent_diagnostics(family, family.prior_init(20), PRIOR)
    assert collapsed.kl == 0 and collapsed.active_units == 0
    assert collapsed.mutual_information == pytest.approx(0.0, abs=1e-5)
    message = collapse_warning(collapsed)
    assert "0 of 3 units active" in message
    torch.manual_seed(0)
    used = torch.cat([3 * torch.randn(20, 3), torch.full((20, 3), -2.0)], 1)
    healthy = latent_diagnostics(family, used, PRIOR)
    assert healthy.active_units == 3 and healthy.kl > 3
    assert collapse_warning(healthy) is None


def test_the_diagonal_fast_path_matches_torch_distributions():
    from amortized.measure.diagnostics import _cross_log_prob

    torch.manual_seed(0)
    family = DiagonalGaussian(4)
    lam = torch.cat([3 * torch.randn(30, 4), torch.randn(30, 4)], 1)
    z = family.distribution(lam[:7]).sample()
    fast = _cross_log_prob(family, lam, z, budget=2**20)
    slow = family.distribution(lam.unsqueeze(0)).log_prob(z.unsqueeze(1))  # (7, 30)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-4)


def test_the_generic_path_agrees_with_the_diagonal_one():
    # A full-covariance q with diagonal L is the same distribution as the diagonal q.
    torch.manual_seed(0)
    loc, log_scale = torch.randn(40, 3), 0.3 * torch.randn(40, 3)
    diagonal = DiagonalGaussian(3).from_gaussian(loc, log_scale)
    full = FullCovarianceGaussian(3).from_gaussian(loc, log_scale)
    torch.manual_seed(1)
    a = mutual_information(DiagonalGaussian(3), diagonal, samples=2)
    torch.manual_seed(1)
    b = mutual_information(FullCovarianceGaussian(3), full, samples=2, budget=500)
    assert a == pytest.approx(b, abs=1e-4) and a > 0.5


def test_a_flow_estimates_mutual_information_on_at_most_the_capped_rows_and_a_gaussian_on_all():
    from amortized import InverseAutoregressiveFlow
    from amortized.measure.diagnostics import COSTLY_DENSITY_MI_ROWS

    n = COSTLY_DENSITY_MI_ROWS + 200
    loc = torch.stack([torch.arange(n) * 40.0, torch.zeros(n)], -1)  # disjoint posteriors
    log_scale = torch.zeros(n, 2)
    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    gaussian = latent_diagnostics(DiagonalGaussian(2), torch.cat([loc, log_scale], -1), prior)
    assert gaussian.mutual_information == pytest.approx(math.log(n), abs=1e-4)
    flow = InverseAutoregressiveFlow(2, layers=1, hidden=3)
    diag = latent_diagnostics(flow, flow.from_gaussian(loc, log_scale), prior)
    assert diag.mutual_information == pytest.approx(math.log(COSTLY_DENSITY_MI_ROWS), abs=1e-4)
    assert diag.kl == pytest.approx(gaussian.kl, rel=0.05)  # the KL still over all n rows
