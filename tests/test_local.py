"""Tests of amortized.inference.local: per-datapoint VI against the linear-Gaussian closed forms."""

from __future__ import annotations

import pytest
import torch
from linear_gaussian import LinearGaussian
from torch.distributions import MultivariateNormal, kl_divergence

from amortized import DiagonalGaussian, FullCovarianceGaussian, elbo, fit_local
from amortized.inference.optimiser import AdamState, adam_step, adam_step_, common_draws_elbo

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lg():
    """p(z) = N(0, I_3), p(x | z) = N(Wz + b, I_6); the diagonal family's gap is 0.191 nats."""
    return LinearGaussian(scale=1.0, seed=2)


@pytest.fixture(scope="module")
def x(lg):
    return lg.sample_x(20)


def evaluate(lg, family, lam, x, samples=2000):
    """ELBO estimates ``(n,)`` and their MC standard errors ``(n,)``."""
    with torch.no_grad():
        torch.manual_seed(123)
        return elbo(lg.model, family, lam, x, samples, stderr=True)


def pooled(se):
    """MC standard error of a mean over rows."""
    return float(se.square().sum().sqrt() / se.numel())


@pytest.fixture(scope="module")
def diagonal_fit(lg, x, single_thread):
    torch.manual_seed(0)
    return fit_local(lg.model, DiagonalGaussian(3), x)


def test_diagonal_fit_reaches_the_closed_form_optimum(lg, x, diagonal_fit):
    family = DiagonalGaussian(3)
    assert diagonal_fit.lam.shape == (20, 6)
    value, se = evaluate(lg, family, diagonal_fit.lam, x)
    shortfall = lg.best_diagonal_elbo(x) - value  # (n,), >= 0 up to MC error
    assert pooled(se) < 0.01
    assert abs(float(shortfall.mean())) < 0.05
    assert float(shortfall.mean()) > -4 * pooled(se)  # no fit beats the optimum
    # the running ELBO the fit reports is a noisy version of the same figure
    assert abs(float((diagonal_fit.elbo - lg.best_diagonal_elbo(x)).mean())) < 0.1


def test_diagonal_fit_finds_posterior_means_and_variances(lg, x, diagonal_fit):
    mean, _ = lg.posterior(x)
    log_scale = -0.5 * torch.diagonal(lg.precision).log()  # best diagonal: var = 1 / Lambda_ii
    mean_err = (diagonal_fit.lam[:, :3] - mean).abs()
    scale_err = (diagonal_fit.lam[:, 3:] - log_scale).abs()
    assert float(mean_err.mean()) < 0.05
    assert float(mean_err.median()) < 0.05
    # With the default stopping rule a row far from the prior can stop short of the
    # optimum (see test_rows_converge_tightly_with_low_noise_gradients); bound it loosely.
    assert float(mean_err.max()) < 0.4
    assert float(scale_err.mean()) < 0.05


def test_rows_converge_tightly_with_low_noise_gradients(lg, x, best_diagonal_lam):
    torch.manual_seed(1)
    family = DiagonalGaussian(3)
    fit = fit_local(lg.model, family, x, samples=64)
    value, se = evaluate(lg, family, fit.lam, x)
    assert ((lg.best_diagonal_elbo(x) - value).abs() < 0.03 + 4 * se).all()
    error = (fit.lam - best_diagonal_lam(lg, x)).abs()
    assert float(error.mean()) < 0.02  # 0.007..0.010 over 12 seeds
    assert float(error.max()) < 0.2  # 0.06..0.125 over 12 seeds


def test_fullcov_fit_closes_the_gap(lg, x):
    torch.manual_seed(2)
    family = FullCovarianceGaussian(3)
    fit = fit_local(lg.model, family, x)
    value, se = evaluate(lg, family, fit.lam, x)
    gap = lg.log_px(x) - value  # approximation gap of the full-covariance family: 0
    assert abs(float(gap.mean())) < 0.05
    assert float(gap.mean()) > -4 * pooled(se)
    _, cov = lg.posterior(x)
    q = family.distribution(fit.lam)
    assert float((q.covariance_matrix - cov).abs().mean()) < 0.02


def test_rows_are_independent(lg, x, best_diagonal_lam, diagonal_fit):
    family = DiagonalGaussian(3)
    row = 3
    torch.manual_seed(3)
    single = fit_local(lg.model, family, x[row : row + 1])
    rows = slice(row, row + 1)
    value_single, se_single = evaluate(lg, family, single.lam, x[rows], 100_000)
    value_batch, se_batch = evaluate(lg, family, diagonal_fit.lam[rows], x[rows], 100_000)
    optimum = float(lg.best_diagonal_elbo(x[rows]))
    # same problem, same init, different noise: the same answer up to optimisation noise
    assert abs(float(value_single) - float(value_batch)) < 0.03
    assert abs(float(value_single) - optimum) < 0.03
    assert max(float(se_single), float(se_batch)) < 0.005


def test_a_row_started_at_the_optimum_stays_there(lg, x, best_diagonal_lam):
    family = DiagonalGaussian(3)
    optimum = best_diagonal_lam(lg, x)
    init = family.prior_init(20, dtype=DTYPE)
    init[0] = optimum[0]  # row 0 at q*, the other rows at the prior
    torch.manual_seed(4)
    fit = fit_local(lg.model, family, x, init)
    assert float((fit.lam[0] - optimum[0]).abs().max()) < 0.08  # Adam noise: 0.01..0.04
    value, se = evaluate(lg, family, fit.lam[:1], x[:1], samples=100_000)
    assert float(se) < 0.005
    assert abs(float(value) - float(lg.best_diagonal_elbo(x[:1]))) < 0.03
    # it has nothing to gain, so it stops before most of the rows that start at the prior
    assert int(fit.steps[0]) <= float(fit.steps[1:].float().median())
    assert int(fit.steps[0]) < int(fit.steps[1:].max())
    assert torch.equal(init[1], family.prior_init(1, dtype=DTYPE)[0])  # init not modified


def test_fit_starts_from_init(lg, x, best_diagonal_lam):
    family = DiagonalGaussian(3)
    init = best_diagonal_lam(lg, x)  # means up to 3.6 away from the prior's
    torch.manual_seed(9)
    fit = fit_local(lg.model, family, x, init, steps=10, lr=0.01)
    # an Adam step moves each coordinate by at most lr (1 - b1) / sqrt(1 - b2) ~ 3.2 lr
    # times its step scale: MEAN_STEP sigma (sigma < 1 here) for a mean, 1 for log sigma
    assert float((fit.lam - init).abs().max()) < 10 * 3.2 * 0.01 * 5
    assert not torch.equal(fit.lam, init)


def test_converged_rows_stop(lg, x, diagonal_fit):
    fit = diagonal_fit  # steps=2000, check_every=50: an easy problem converges well before
    assert fit.converged.dtype == torch.bool
    assert fit.converged.all()
    assert int(fit.steps.max()) < 2000
    assert (fit.steps % 50 == 0).all()
    assert len(set(fit.steps.tolist())) > 1  # rows stop at different times
    active = fit.trace["active"]
    assert active[-1] == 0
    assert all(a >= b for a, b in zip(active, active[1:], strict=False))
    assert fit.trace["step"][-1] == int(fit.steps.max())
    # the count of active rows at each check matches the rows' own step counts
    for step, count in zip(fit.trace["step"], active, strict=True):
        assert count == int((fit.steps > step).sum())


def test_step_budget_caps_every_row(lg, x):
    torch.manual_seed(5)
    # two windows: at most one plateau, so no row can meet the 3-plateau stopping rule
    fit = fit_local(lg.model, DiagonalGaussian(3), x, steps=80, check_every=50)
    assert (fit.steps == 80).all()  # 50 + a last window of 30
    assert not fit.converged.any()
    assert fit.trace["step"] == [50, 80]


def test_without_a_tolerance_every_row_takes_every_step_and_nothing_is_checked(lg, x, monkeypatch):
    import amortized.inference.optimiser as optimiser

    def no_check(*args, **kwargs):
        raise AssertionError("the plateau check ran although no row can plateau")

    monkeypatch.setattr(optimiser, "common_draws_elbo", no_check)
    fit = fit_local(lg.model, DiagonalGaussian(3), x, steps=60, check_every=25, tol=-float("inf"))
    assert bool((fit.steps == 60).all()) and not bool(fit.converged.any())
    assert fit.trace["step"] == [25, 50, 60]


def test_batch_size_gives_the_same_quality(lg, x, diagonal_fit):
    family = DiagonalGaussian(3)
    torch.manual_seed(6)
    fit = fit_local(lg.model, family, x, batch_size=7)  # blocks of 7, 7 and 6 rows
    assert fit.lam.shape == (20, 6)
    assert fit.elbo.shape == fit.steps.shape == fit.converged.shape == (20,)
    value, se = evaluate(lg, family, fit.lam, x)
    reference, _ = evaluate(lg, family, diagonal_fit.lam, x)
    assert abs(float((lg.best_diagonal_elbo(x) - value).mean())) < 0.05
    assert abs(float((value - reference).mean())) < 0.03
    # block traces are concatenated: one entry per check of each block
    steps = fit.trace["step"]
    assert sum(1 for a, b in zip(steps, steps[1:], strict=False) if b < a) == 2


def test_model_parameters_get_no_gradient(lg, x):
    before = {name: p.detach().clone() for name, p in lg.model.named_parameters()}
    assert before  # the decoder's W and b are parameters
    torch.manual_seed(7)
    fit_local(lg.model, DiagonalGaussian(3), x[:4], steps=100)
    for name, p in lg.model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name


def test_init_with_wrong_shape_raises(lg, x):
    family = DiagonalGaussian(3)
    for shape in [(19, 6), (20, 5), (20, 9), (20,)]:
        with pytest.raises(ValueError, match=r"\(20, 6\)"):
            fit_local(lg.model, family, x, torch.zeros(shape, dtype=DTYPE))
    with pytest.raises(ValueError, match="steps"):
        fit_local(lg.model, family, x, steps=0)
    with pytest.raises(ValueError, match="samples"):
        fit_local(lg.model, family, x, samples=0)


def test_adam_step_matches_torch_adam_per_row():
    g = torch.Generator().manual_seed(8)
    lam0 = torch.randn(2, 3, generator=g, dtype=DTYPE)
    grads = torch.randn(5, 2, 3, generator=g, dtype=DTYPE)
    lr = torch.tensor([0.1, 0.01], dtype=DTYPE)  # a different step size for each row
    lam, state = lam0.clone(), AdamState.zeros_like(lam0)
    for grad in grads:
        lam, state = adam_step(lam, grad, state, lr)
    assert torch.equal(state.t, torch.full((2,), 5.0, dtype=DTYPE))
    for row in range(2):
        p = lam0[row].clone().requires_grad_()
        opt = torch.optim.Adam([p], lr=float(lr[row]), maximize=True)
        for grad in grads:
            p.grad = grad[row].clone()
            opt.step()
        torch.testing.assert_close(lam[row], p.detach())


def test_in_place_adam_step_is_the_pure_step_with_step_scales():
    g = torch.Generator().manual_seed(9)
    lam0 = torch.randn(3, 4, generator=g, dtype=DTYPE)
    scale = torch.rand(3, 4, generator=g, dtype=DTYPE) + 0.1
    lr = torch.tensor([0.1, 0.02, 0.5], dtype=DTYPE)
    pure, pure_state = lam0.clone(), AdamState.zeros_like(lam0)
    inplace, state = lam0.clone(), AdamState.zeros_like(lam0)
    for _ in range(4):
        grad = torch.randn(3, 4, generator=g, dtype=DTYPE)
        pure, pure_state = adam_step(pure, grad, pure_state, lr, scale)
        adam_step_(inplace, grad.clone(), state, lr, scale)
    torch.testing.assert_close(inplace, pure, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state.v, pure_state.v, rtol=1e-12, atol=1e-14)
    # whitened coordinates: the same problem in units c times larger (lam * c, its
    # gradient / c, its step scale * c) takes the same steps, c times larger
    c = 10.0
    grad = torch.randn(3, 4, generator=g, dtype=DTYPE)
    ref, _ = adam_step(lam0, grad, AdamState.zeros_like(lam0), lr, scale)
    moved, _ = adam_step(lam0 * c, grad / c, AdamState.zeros_like(lam0), lr, scale * c)
    torch.testing.assert_close(moved, ref * c, rtol=1e-12, atol=1e-12)


def test_common_draws_repeat_their_noise_and_leave_the_random_state(lg, x):
    family = DiagonalGaussian(3)
    mean, cov = lg.posterior(x)
    posterior = MultivariateNormal(mean, cov)
    before = torch.cat([0.5 * mean, torch.zeros_like(mean)], dim=-1)
    near = before + 0.05 * (family.from_gaussian(mean, torch.zeros_like(mean)) - before)

    def kl(lam):  # log p(x) - L[q], exactly
        loc, log_scale = lam.split(3, dim=-1)
        q = MultivariateNormal(loc, torch.diag_embed(log_scale.exp().square()))
        return kl_divergence(q, posterior)

    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = common_draws_elbo(lg.model, family, before, x, 32, seed=5, analytic_kl=True)
    b = common_draws_elbo(lg.model, family, before, x, 32, seed=5, analytic_kl=True)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    paired = torch.stack([
        common_draws_elbo(lg.model, family, near, x, 32, seed, True)
        - common_draws_elbo(lg.model, family, before, x, 32, seed, True)
        for seed in range(30)
    ])  # fmt: skip
    error = paired.mean(0) - (kl(before) - kl(near))  # (n,), unbiased
    assert (error.abs() < 4.5 * paired.std(0) / 30**0.5 + 1e-12).all()
    with torch.no_grad():
        separate = torch.stack([
            elbo(lg.model, family, near, x, 32) - elbo(lg.model, family, before, x, 32)
            for _ in range(30)
        ])  # fmt: skip
    assert float(paired.std(0).mean()) < 0.2 * float(separate.std(0).mean())


class SlowScaleDiagonal(DiagonalGaussian):
    def step_scale(self, lam):
        return torch.tensor([1.0, 1.0, 1.0, 0.25, 0.25, 0.25], dtype=lam.dtype).expand_as(lam)


def test_steps_follow_the_family_step_scale_entry_by_entry(lg, x):
    """Adam's first step moves every entry by lr times its step scale (m / sqrt(v) = sign g):
    a diagonal Gaussian's mean by MEAN_STEP * sigma, its log sigma by 1."""
    from amortized.families import MEAN_STEP

    moves = {}
    for family in (DiagonalGaussian(3), SlowScaleDiagonal(3)):
        fit = fit_local(lg.model, family, x, steps=1, check_every=1, lr=0.1, tol=-float("inf"))
        moves[type(family)] = (fit.lam - family.prior_init(20, dtype=DTYPE)).abs()
    expected = torch.tensor([0.1 * MEAN_STEP] * 3 + [0.1] * 3, dtype=DTYPE)
    torch.testing.assert_close(moves[DiagonalGaussian].amax(0), expected)
    expected = torch.tensor([0.1] * 3 + [0.025] * 3, dtype=DTYPE)
    torch.testing.assert_close(moves[SlowScaleDiagonal].amax(0), expected)
