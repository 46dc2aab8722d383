"""Tests of amortized.estimators against the closed forms of the linear-Gaussian model.

Tolerances are either stated in nats or in Monte Carlo standard errors (s.e.); every
random draw is seeded, so a pass or a failure reproduces exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from linear_gaussian import LinearGaussian
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    StudentT,
    kl_divergence,
)

from amortized import (
    DiagonalGaussian,
    FullCovarianceGaussian,
    elbo,
    estimators,
    iwae_bound,
    kl_to_prior,
)

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def lg():
    """p(z) = N(0, I_3), p(x | z) = N(Wz + b, 0.7^2 I_6); diagonal gap 0.091 nats."""
    return LinearGaussian()


def pooled_se(se: torch.Tensor) -> float:
    """Standard error of the mean of independent estimates with standard errors ``se``."""
    return float(se.square().sum().sqrt() / se.numel())


def perturbed_diagonal(lam: torch.Tensor, shift: float, inflate: float) -> torch.Tensor:
    """Move the means by ``shift`` and the log-scales by ``inflate`` (a worse proposal)."""
    d = lam.shape[-1] // 2
    return torch.cat([lam[:, :d] + shift, lam[:, d:] + inflate], dim=-1)


# --- log p(x) and the IWAE bound ---------------------------------------------------------


@torch.no_grad()
def test_iwae_with_good_proposal_estimates_log_px(lg, best_diagonal_lam):
    torch.manual_seed(0)
    x = lg.sample_x(50)
    exact = lg.log_px(x)
    # The best diagonal q is narrower than the posterior, so its importance weights are
    # heavy-tailed (over 30 seeds, 1 run in 10 had a point off by more than 0.05, one by
    # 0.47 nats). Scales 1.22x wider (log-scale + 0.2) give light tails: worst point 0.027.
    lam = perturbed_diagonal(best_diagonal_lam(lg, x), shift=0.0, inflate=0.2)
    est = iwae_bound(lg.model, DiagonalGaussian(3), lam, x, k=5000)
    assert est.shape == (50,)
    assert (est - exact).abs().max() < 0.05  # per point
    assert abs(float((est - exact).mean())) < 0.02  # on average


@torch.no_grad()
def test_iwae_with_one_sample_is_the_elbo_in_expectation(lg, best_diagonal_lam):
    torch.manual_seed(1)
    n, reps = 4, 5000
    x = lg.sample_x(n)
    lam = perturbed_diagonal(best_diagonal_lam(lg, x), shift=0.3, inflate=0.3)
    family = DiagonalGaussian(3)
    # reps independent single-sample IWAE estimates per point, by repeating the rows
    single = iwae_bound(lg.model, family, lam.repeat(reps, 1), x.repeat(reps, 1), k=1)
    single = single.reshape(reps, n)  # (reps, n)
    mean, se = single.mean(0), single.std(0) / math.sqrt(reps)
    ref, ref_se = elbo(lg.model, family, lam, x, samples=20000, stderr=True)
    assert ((mean - ref).abs() < 4 * (se.square() + ref_se.square()).sqrt()).all()
    # the ELBO of this proposal is well below log p(x): the comparison is not trivial
    assert (lg.log_px(x) - ref).min() > 1.0


@torch.no_grad()
def test_iwae_increases_with_k(lg, best_diagonal_lam):
    torch.manual_seed(2)
    x = lg.sample_x(500)
    exact = lg.log_px(x)
    lam = perturbed_diagonal(best_diagonal_lam(lg, x), shift=0.3, inflate=0.7)
    family = DiagonalGaussian(3)
    bounds, ses = {}, {}
    for k in (1, 10, 1000):
        value, se = iwae_bound(lg.model, family, lam, x, k=k, stderr=True)
        bounds[k], ses[k] = float((value - exact).mean()), pooled_se(se)
    # averages, relative to log p(x): about -3.8, -0.22 (+-0.03 over seeds) and -0.003 nats
    assert bounds[1] + 1.0 < bounds[10]
    assert bounds[10] + 0.05 < bounds[1000]
    assert bounds[10] + 4 * ses[10] < bounds[1000]
    assert bounds[1000] < 4 * ses[1000]  # a lower bound on log p(x), up to MC error
    assert bounds[1000] > -0.05


# --- the ELBO against closed forms ---------------------------------------------------------


@torch.no_grad()
def test_elbo_of_exact_posterior_is_log_px_with_no_variance(lg, exact_posterior_lam):
    torch.manual_seed(3)
    x = lg.sample_x(20)
    exact = lg.log_px(x)
    lam = exact_posterior_lam(lg, x)
    family = FullCovarianceGaussian(3)
    # log p(x, z) - log q(z) = log p(x) for every z when q is the posterior
    value, se = elbo(lg.model, family, lam, x, samples=100, analytic_kl=False, stderr=True)
    torch.testing.assert_close(value, exact, rtol=0, atol=1e-9)
    assert se.max() < 1e-6
    value = iwae_bound(lg.model, family, lam, x, k=100)
    torch.testing.assert_close(value, exact, rtol=0, atol=1e-9)
    # with the KL in closed form the estimate varies, but is unbiased
    value, se = elbo(lg.model, family, lam, x, samples=2000, stderr=True)
    assert abs(float((value - exact).mean())) < 4 * pooled_se(se)


@pytest.mark.parametrize("analytic_kl", [True, False])
@torch.no_grad()
def test_elbo_of_best_diagonal_is_log_px_minus_gap(lg, best_diagonal_lam, analytic_kl):
    torch.manual_seed(4)
    x = lg.sample_x(50)
    expected = lg.best_diagonal_elbo(x)  # log p(x) - 1/2 (sum log Lambda_ii - log det Lambda)
    value, se = elbo(
        lg.model,
        DiagonalGaussian(3),
        best_diagonal_lam(lg, x),
        x,
        2000,
        analytic_kl=analytic_kl,
        stderr=True,
    )
    assert ((value - expected).abs() < 4.5 * se).all()
    assert abs(float((value - expected).mean())) < 4 * pooled_se(se)
    assert pooled_se(se) < 0.01


@pytest.mark.parametrize("cls", [DiagonalGaussian, FullCovarianceGaussian])
@torch.no_grad()
def test_analytic_and_sampled_kl_agree(lg, cls):
    torch.manual_seed(5)
    x = lg.sample_x(30)
    family = cls(3)
    lam = 0.3 * torch.randn(30, family.num_params, dtype=DTYPE)
    a, a_se = elbo(lg.model, family, lam, x, 2000, analytic_kl=True, stderr=True)
    b, b_se = elbo(lg.model, family, lam, x, 2000, analytic_kl=False, stderr=True)
    both = (a_se.square() + b_se.square()).sqrt()
    assert ((a - b).abs() < 4.5 * both).all()
    assert abs(float((a - b).mean())) < 4 * pooled_se(both)


def test_beta_weights_the_kl_term(lg):
    x = lg.sample_x(5)
    family = DiagonalGaussian(3)
    lam = 0.3 * torch.randn(5, 6, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    q = family.distribution(lam)

    def at(beta, analytic_kl):
        torch.manual_seed(7)  # the same z for every call
        return elbo(lg.model, family, lam, x, 10, beta=beta, analytic_kl=analytic_kl)

    # beta = 0 leaves E[log p(x | z)], the same with the same z whatever the KL route
    torch.testing.assert_close(at(0.0, True), at(0.0, False))
    # closed form: E[log p(x | z)] - beta KL
    kl = kl_to_prior(q, lg.model.prior)
    torch.testing.assert_close(at(0.0, True) - at(0.5, True), 0.5 * kl)
    # sampled: E[log p(x | z)] + beta E[log p(z) - log q(z)], with the draws of the call
    torch.manual_seed(7)
    z = q.rsample((10,))  # (10, 5, 3): the z the estimator draws
    log_ratio = (lg.model.prior.log_prob(z) - q.log_prob(z)).mean(0)  # (5,)
    torch.testing.assert_close(at(0.5, False) - at(0.0, False), 0.5 * log_ratio)


# --- standard errors and chunking ---------------------------------------------------------


@pytest.mark.parametrize("estimator", ["elbo-analytic", "elbo-sampled", "iwae"])
@torch.no_grad()
def test_stderr_matches_spread_of_repeated_estimates(lg, best_diagonal_lam, estimator):
    torch.manual_seed(8)
    n, reps = 5, 400
    x = lg.sample_x(n)
    lam = perturbed_diagonal(best_diagonal_lam(lg, x), shift=0.1, inflate=0.2)
    lam_r, x_r = lam.repeat(reps, 1), x.repeat(reps, 1)  # reps independent copies per point
    family = DiagonalGaussian(3)
    if estimator == "iwae":
        value, se = iwae_bound(lg.model, family, lam_r, x_r, k=50, stderr=True)
    else:
        analytic = estimator == "elbo-analytic"
        value, se = elbo(lg.model, family, lam_r, x_r, 20, analytic_kl=analytic, stderr=True)
    spread = value.reshape(reps, n).std(0)  # (n,)
    ratio = spread / se.reshape(reps, n).mean(0)
    assert ((0.7 < ratio) & (ratio < 1.4)).all(), ratio


@torch.no_grad()
def test_chunking_is_exact_when_weights_are_constant(lg, exact_posterior_lam):
    torch.manual_seed(9)
    x = lg.sample_x(4)
    exact = lg.log_px(x)
    family = FullCovarianceGaussian(3)
    lam = exact_posterior_lam(lg, x)
    # 7 samples in chunks of 1, 3 (3 + 3 + 1) and one chunk: each sample weighs 1/7
    for chunk in (1, 3, None):
        value = elbo(lg.model, family, lam, x, 7, analytic_kl=False, chunk_size=chunk)
        torch.testing.assert_close(value, exact, rtol=0, atol=1e-10)
        value = iwae_bound(lg.model, family, lam, x, k=7, chunk_size=chunk)
        torch.testing.assert_close(value, exact, rtol=0, atol=1e-10)


@torch.no_grad()
def test_chunk_size_does_not_change_the_estimate(lg, best_diagonal_lam):
    x = lg.sample_x(10)
    lam = perturbed_diagonal(best_diagonal_lam(lg, x), shift=0.2, inflate=0.3)
    family = DiagonalGaussian(3)
    out = {}
    for chunk in (1, None):
        torch.manual_seed(10)
        for name, estimator in (("elbo", elbo), ("iwae", iwae_bound)):
            out[name, chunk] = estimator(
                lg.model, family, lam, x, 1000, chunk_size=chunk, stderr=True
            )
    for name in ("elbo", "iwae"):
        (a, a_se), (b, b_se) = out[name, 1], out[name, None]
        assert ((a - b).abs() < 4.5 * (a_se.square() + b_se.square()).sqrt()).all(), name
        assert not torch.equal(a, b), name  # really two independent estimates


@torch.no_grad()
def test_memory_is_bounded_by_chunking(lg, exact_posterior_lam, monkeypatch):
    torch.manual_seed(11)
    x = lg.sample_x(5)  # x.numel() == 30
    exact = lg.log_px(x)
    lam = exact_posterior_lam(lg, x)
    family = FullCovarianceGaussian(3)
    # the default bound: k = 20000 runs and is finite
    value = iwae_bound(lg.model, family, lam, x, k=20000)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, exact, rtol=0, atol=1e-8)
    # a small bound: no decoder call sees more than the bound's data-sized values (on this
    # CPU, CPU_CHUNK_ELEMENTS)
    monkeypatch.setattr(estimators, "CPU_CHUNK_ELEMENTS", 1000)
    seen = []
    hook = lg.model.decoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    try:
        value = iwae_bound(lg.model, family, lam, x, k=20000)
        estimate = elbo(lg.model, family, lam, x, 20000, analytic_kl=False)
    finally:
        hook.remove()
    assert max(shape[0] for shape in seen) * x.numel() <= 1000
    assert sum(shape[0] for shape in seen) == 2 * 20000
    torch.testing.assert_close(value, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.no_grad()
def test_elbo_stderr_is_the_spread_of_its_own_terms(exact_posterior_lam, dtype):
    lg = LinearGaussian(dtype=dtype)
    x = lg.sample_x(4) + 100.0  # far from the data mean: log p(x | z) is about -4e4
    family = FullCovarianceGaussian(3)
    lam = exact_posterior_lam(lg, x)
    samples = 10_000
    torch.manual_seed(18)
    _, se = elbo(lg.model, family, lam, x, samples, stderr=True)  # one chunk
    torch.manual_seed(18)
    z = family.distribution(lam).rsample((samples,))  # the same draws, (S, n, D)
    terms = lg.model.log_likelihood(x, z)  # what the estimator averages, (S, n)
    expected = terms.double().std(0) / math.sqrt(samples)  # two-pass, in float64
    assert float(lg.log_px(x).max()) < -3e4
    torch.testing.assert_close(se.double(), expected, rtol=0.1, atol=0)


@pytest.mark.parametrize("estimator", [elbo, iwae_bound])
@pytest.mark.parametrize("chunk_size", [0, -2])
def test_bad_chunk_size_raises_value_error(lg, estimator, chunk_size):
    x = lg.sample_x(4)
    family = DiagonalGaussian(3)
    with pytest.raises(ValueError, match="chunk_size"):
        estimator(lg.model, family, family.prior_init(4, dtype=DTYPE), x, 5, chunk_size=chunk_size)


@pytest.mark.parametrize("estimator", [elbo, iwae_bound])
def test_one_sample_has_no_standard_error(lg, estimator):
    x = lg.sample_x(3)
    family = DiagonalGaussian(3)
    _, se = estimator(lg.model, family, family.prior_init(3, dtype=DTYPE), x, 1, stderr=True)
    assert torch.isnan(se).all()


# --- closed-form KL ------------------------------------------------------------------------


def test_kl_to_prior_matches_closed_form(lg):
    g = torch.Generator().manual_seed(12)
    d = 3
    loc = torch.randn(4, d, generator=g, dtype=DTYPE)
    tril = torch.randn(4, d, d, generator=g, dtype=DTYPE).tril(-1) + torch.diag_embed(
        torch.rand(4, d, generator=g, dtype=DTYPE) + 0.5
    )
    cov = tril @ tril.mT
    # KL(N(m, S) || N(0, I)) = 1/2 (tr S + m^T m - D - log det S)
    expected = 0.5 * (
        torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) + loc.square().sum(-1) - d - torch.logdet(cov)
    )
    family = FullCovarianceGaussian(d)
    q = family.distribution(FullCovarianceGaussian.params_from(loc, tril))
    torch.testing.assert_close(kl_to_prior(q, lg.model.prior), expected)
    # the diagonal family through torch's own Independent-Normal pair
    scale = torch.rand(4, d, generator=g, dtype=DTYPE) + 0.5
    q = DiagonalGaussian(d).distribution(torch.cat([loc, scale.log()], dim=-1))
    expected = 0.5 * (scale.square() + loc.square() - 1 - 2 * scale.log()).sum(-1)
    torch.testing.assert_close(kl_to_prior(q, lg.model.prior), expected)


def test_kl_to_prior_fullcov_against_a_non_standard_factorized_prior():
    g = torch.Generator().manual_seed(17)
    family = FullCovarianceGaussian(3)
    q = family.distribution(torch.randn(4, family.num_params, generator=g, dtype=DTYPE))
    loc = torch.randn(3, generator=g, dtype=DTYPE)
    scale = torch.rand(3, generator=g, dtype=DTYPE) + 0.5
    prior = Independent(Normal(loc, scale), 1)
    reference = MultivariateNormal(loc, covariance_matrix=torch.diag(scale.square()))
    torch.testing.assert_close(kl_to_prior(q, prior), kl_divergence(q, reference))


def test_kl_to_prior_without_closed_form_is_none(lg):
    q = Independent(StudentT(3.0, torch.zeros(2, 3, dtype=DTYPE), torch.ones(2, 3, dtype=DTYPE)), 1)
    assert kl_to_prior(q, lg.model.prior) is None
    q = MultivariateNormal(torch.zeros(2, 3, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    prior = Independent(StudentT(3.0, torch.zeros(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE)), 1)
    assert kl_to_prior(q, prior) is None
    q = Independent(Normal(torch.zeros(2, 3, dtype=DTYPE), 1.0), 1)
    torch.testing.assert_close(kl_to_prior(q, lg.model.prior), torch.zeros(2, dtype=DTYPE))


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DiagonalGaussian, FullCovarianceGaussian])
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_elbo_gradient_matches_finite_differences(lg, cls, analytic_kl):
    x = lg.sample_x(3)
    family = cls(3)
    g = torch.Generator().manual_seed(13)
    lam = (0.3 * torch.randn(3, family.num_params, generator=g, dtype=DTYPE)).requires_grad_()

    def f(lam):
        torch.manual_seed(14)  # the same noise at every evaluation: a smooth function of lam
        return elbo(lg.model, family, lam, x, 4, analytic_kl=analytic_kl)

    assert torch.autograd.gradcheck(f, (lam,))


@pytest.mark.parametrize("cls", [DiagonalGaussian, FullCovarianceGaussian])
def test_iwae_gradient_matches_finite_differences(lg, cls):
    x = lg.sample_x(3)
    family = cls(3)
    g = torch.Generator().manual_seed(15)
    lam = (0.3 * torch.randn(3, family.num_params, generator=g, dtype=DTYPE)).requires_grad_()

    def f(lam):
        torch.manual_seed(16)
        return iwae_bound(lg.model, family, lam, x, 5, chunk_size=2)

    assert torch.autograd.gradcheck(f, (lam,))


# --- argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [elbo, iwae_bound])
def test_bad_inputs_raise_value_error(lg, estimator):
    x = lg.sample_x(5)
    family = DiagonalGaussian(3)
    lam = family.prior_init(5, dtype=DTYPE)
    with pytest.raises(ValueError, match="batch"):
        estimator(lg.model, family, lam[:4], x, 2)  # 4 rows of lam for 5 datapoints
    with pytest.raises(ValueError, match="shape"):
        estimator(lg.model, family, lam[0], x, 2)  # no batch axis
    with pytest.raises(ValueError, match="latent_dim"):
        estimator(lg.model, DiagonalGaussian(2), DiagonalGaussian(2).prior_init(5), x, 2)
    with pytest.raises(ValueError, match=">= 1"):
        estimator(lg.model, family, lam, x, 0)  # samples=0 / k=0
    with pytest.raises(ValueError, match=">= 1"):
        estimator(lg.model, family, lam, x, -3)


@pytest.mark.parametrize("estimator", ["iwae", "elbo"])
def test_past_the_graph_limit_chunks_are_recomputed_with_the_same_values_and_gradients(
    lg, estimator, monkeypatch
):
    """Under autograd, past GRAD_KEPT_ELEMENTS each chunk of samples is checkpointed: the
    bound and its gradients (to lambda and to the model) are those of keeping every
    chunk's graph, drawn from the same random numbers."""
    family = DiagonalGaussian(3)
    x = lg.sample_x(4, seed=0).to(DTYPE)
    lam0 = family.prior_init(4, dtype=DTYPE) + 0.1

    def run(limit):
        monkeypatch.setattr(estimators, "GRAD_KEPT_ELEMENTS", limit)
        lam = lam0.clone().requires_grad_(True)
        lg.model.zero_grad()
        torch.manual_seed(5)
        if estimator == "iwae":
            value, se = iwae_bound(lg.model, family, lam, x, 300, chunk_size=7, stderr=True)
        else:
            value, se = elbo(lg.model, family, lam, x, 300, chunk_size=7, stderr=True,
                             analytic_kl=False)  # fmt: skip
        value.sum().backward()
        grads = [p.grad.clone() for p in lg.model.parameters() if p.grad is not None]
        return value.detach(), se, lam.grad, grads, torch.get_rng_state()

    kept, recomputed = run(10**12), run(1)
    for a, b in zip(kept[:3], recomputed[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert kept[3] and len(kept[3]) == len(recomputed[3])
    for a, b in zip(kept[3], recomputed[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(kept[4], recomputed[4])  # the caller's random stream moved alike


def test_past_the_graph_limit_the_graph_kept_does_not_grow_with_the_samples(lg, monkeypatch):
    family = DiagonalGaussian(3)
    x = lg.sample_x(4, seed=0).to(DTYPE)

    def saved_bytes(k, chunk_size):
        lam = (family.prior_init(4, dtype=DTYPE) + 0.1).requires_grad_(True)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            iwae_bound(lg.model, family, lam, x, k, chunk_size=chunk_size).sum().backward()
        return total[0]

    monkeypatch.setattr(estimators, "GRAD_KEPT_ELEMENTS", 1)
    # 20 chunks of 10 or of 500 samples: only each chunk's (batch,) outputs are kept
    few, many = saved_bytes(200, 10), saved_bytes(10_000, 500)
    assert many == few
    monkeypatch.setattr(estimators, "GRAD_KEPT_ELEMENTS", 10**12)
    assert saved_bytes(10_000, 500) > 40 * many  # keeping every chunk's graph grows with k
