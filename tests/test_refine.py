"""Test-time refinement: K = 0 is the encoder, L[q] climbs to L[q*], and gradients flow."""

from __future__ import annotations

import pytest
import torch
from linear_gaussian import LinearGaussian
from torch import nn

from amortized import DiagonalGaussian, LatentVariableModel, elbo
from amortized.inference.refine import refine, refinement_curve, refinement_path
from amortized.nets.decoders import BernoulliMLPDecoder

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian(scale=1.0, seed=2)  # best diagonal: gap 0.191 nats


def shrunk_encoder_output(lg, x):
    """lambda_0 of a poor encoder: N(0.5 m(x), I) where the posterior is N(m(x), S)."""
    mean, _ = lg.posterior(x)
    return torch.cat([0.5 * mean, torch.zeros_like(mean)], dim=-1)


def test_zero_steps_is_the_encoder(lg):
    x = lg.sample_x(7)
    lam0 = shrunk_encoder_output(lg, x)
    family = DiagonalGaussian(3)
    assert torch.equal(refine(lg.model, family, x, lam0, steps=0), lam0)
    curve = refinement_curve(lg.model, family, x, lam0, steps=(0,), elbo_samples=50)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = float(elbo(lg.model, family, lam0, x, 50).mean())
    assert curve[0].steps == 0 and curve[0].seconds_per_datapoint == 0.0
    assert abs(curve[0].elbo - expected) < 6 * curve[0].stderr


def test_bound_rises_with_steps_and_reaches_the_optimum(lg):
    x = lg.sample_x(40)
    family = DiagonalGaussian(3)
    lam0 = shrunk_encoder_output(lg, x)
    torch.manual_seed(0)
    curve = refinement_curve(
        lg.model, family, x, lam0, steps=(0, 1, 2, 5, 10, 20, 50, 200), elbo_samples=4000,
        method="sgd", lr=0.02, momentum=0.5, samples=8,
    )  # fmt: skip
    values = [p.elbo for p in curve]
    noise = max(p.stderr for p in curve)
    assert all(b > a - 4 * noise for a, b in zip(values, values[1:], strict=False))
    assert values[-1] - values[0] > 1.0  # the poor encoder was far from q*
    optimum = float(lg.best_diagonal_elbo(x).mean())
    # constant-step SGD hovers near the optimum (0.02 nats below it at this step size)
    assert abs(values[-1] - optimum) < 0.05
    times = [p.seconds_per_datapoint for p in curve]
    assert times == sorted(times)


def test_gradient_norm_is_clipped_row_by_row(lg):
    x = lg.sample_x(5) * 50  # far from anything: huge gradients
    family = DiagonalGaussian(3)
    lam0 = family.prior_init(5, dtype=DTYPE)
    lam1 = refine(lg.model, family, x, lam0, steps=1, method="sgd", lr=0.3, max_grad_norm=2.0)
    torch.testing.assert_close((lam1 - lam0).norm(dim=-1), torch.full((5,), 0.6, dtype=DTYPE))


def _tiny_bernoulli_model():
    torch.manual_seed(0)
    decoder = BernoulliMLPDecoder(2, 4, hidden=(3,)).to(DTYPE)
    return LatentVariableModel(decoder, 2).to(DTYPE)


@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_gradients_through_the_unrolled_steps_match_finite_differences(method):
    model = _tiny_bernoulli_model()
    family = DiagonalGaussian(2)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=DTYPE)
    weight = next(model.decoder.parameters())

    def refined_bound(lam0):
        torch.manual_seed(3)  # the same draws in every evaluation
        lam = refine(model, family, x, lam0, steps=3, method=method, lr=0.3,
                     max_grad_norm=None, samples=2, create_graph=True)  # fmt: skip
        torch.manual_seed(4)
        return elbo(model, family, lam, x, 4).sum()

    lam0 = (0.3 * torch.randn(2, 4, dtype=DTYPE)).requires_grad_(True)
    assert torch.autograd.gradcheck(refined_bound, (lam0,))
    # and through the model's parameters (the decoder learns through the K steps)
    (analytic,) = torch.autograd.grad(refined_bound(lam0.detach()), weight)
    direction, eps = torch.randn_like(weight), 1e-6
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            weight.add_(sign * eps * direction)
            with torch.enable_grad():
                values.append(refined_bound(lam0.detach()).detach())
            weight.sub_(sign * eps * direction)
    numeric = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close((analytic * direction).sum(), numeric, rtol=1e-5, atol=1e-7)


def test_bad_arguments(lg):
    x = lg.sample_x(3)
    family = DiagonalGaussian(3)
    with pytest.raises(ValueError, match="steps"):
        refine(lg.model, family, x, family.prior_init(3, dtype=DTYPE), steps=-1)
    with pytest.raises(ValueError, match="shape"):
        refine(lg.model, family, x, family.prior_init(4, dtype=DTYPE), steps=1)
    with pytest.raises(ValueError, match="method"):
        refine(lg.model, family, x, family.prior_init(3, dtype=DTYPE), steps=1, method="lbfgs")
    with pytest.raises(ValueError, match="non-negative"):
        refinement_curve(lg.model, family, x, family.prior_init(3, dtype=DTYPE), steps=(-1,))


def test_module_is_a_plain_function_of_its_inputs(lg):
    """Refinement never touches the model's parameters or their gradients."""
    x = lg.sample_x(4)
    family = DiagonalGaussian(3)
    before = [p.detach().clone() for p in lg.model.parameters()]
    refine(lg.model, family, x, family.prior_init(4, dtype=DTYPE), steps=3)
    for p, b in zip(lg.model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None
    assert isinstance(lg.model, nn.Module)


def test_adam_refinement_reaches_the_optimum(lg):
    x = lg.sample_x(40)
    family = DiagonalGaussian(3)
    torch.manual_seed(1)
    curve = refinement_curve(lg.model, family, x, shrunk_encoder_output(lg, x),
                             steps=(0, 300), elbo_samples=4000, samples=8)  # fmt: skip
    optimum = float(lg.best_diagonal_elbo(x).mean())
    assert optimum - curve[0].elbo > 1.0
    assert abs(curve[-1].elbo - optimum) < 0.05


def test_differentiating_through_adam_steps_stays_finite_where_a_gradient_is_zero():
    """The IAF's masked weights never move the ELBO: their gradient is exactly 0."""
    from amortized import InverseAutoregressiveFlow

    model = _tiny_bernoulli_model()
    family = InverseAutoregressiveFlow(2, layers=1, hidden=2)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=DTYPE)
    lam0 = family.prior_init(1, dtype=DTYPE).requires_grad_(True)
    torch.manual_seed(0)
    lam = refine(model, family, x, lam0, steps=3, create_graph=True)
    torch.manual_seed(1)
    (grad,) = torch.autograd.grad(elbo(model, family, lam, x, 4).sum(), lam0)
    assert torch.isfinite(grad).all()


def _near_optimum(lg, x, best_diagonal_lam):
    """An encoder-like start: the diagonal optimum with its means two posterior SDs off
    and its log scales 0.5 off."""
    family = DiagonalGaussian(lg.latent_dim)
    optimum = best_diagonal_lam(lg, x)
    g = torch.Generator().manual_seed(3)
    d = lg.latent_dim
    sd = optimum[:, d:].exp()
    offset = torch.cat([2 * sd, 0.5 * torch.ones_like(sd)], dim=-1)
    signs = torch.randint(0, 2, optimum.shape, generator=g).to(optimum) * 2 - 1
    return family, optimum, optimum + signs * offset


@pytest.mark.parametrize("name", ["broad", "peaked", "correlated"])
def test_the_refinement_curve_meets_q_star(name, best_diagonal_lam):
    """The default Adam refinement climbs to the diagonal optimum as K grows (a fixed step
    stalled 0.05-10 nats short on these models), and its curve never falls below its
    start."""
    from battery import battery, exact_elbo

    lg, x = battery()[name]
    family, _, start = _near_optimum(lg, x, best_diagonal_lam)
    optimum = float(lg.best_diagonal_elbo(x).mean())
    torch.manual_seed(0)
    curve = {
        k: float(exact_elbo(lg, family.distribution(lam), x).mean())
        for k, lam, _ in refinement_path(lg.model, family, x, start, [0, 100, 500, 2000])
    }
    assert optimum - curve[2000] < 0.05, (name, curve)
    assert curve[100] > curve[0] and curve[2000] > curve[500] - 0.01, (name, curve)
