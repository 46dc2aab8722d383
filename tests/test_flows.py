"""Flows: the inverse inverts, log|det J| equals autograd's, and the families help."""

from __future__ import annotations

import pytest
import torch
from linear_gaussian import LinearGaussian
from torch.autograd.functional import jacobian
from torch.distributions import Independent, Normal

from amortized import DiagonalGaussian, MLPEncoder, elbo, fit_local, iwae_bound
from amortized.families.flows import (
    InverseAutoregressiveFlow,
    PlanarFlow,
    PlanarTransform,
    made_masks,
)

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def _transform(batch_shape, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((*batch_shape, d), generator=g, dtype=DTYPE)
    w = torch.randn((*batch_shape, d), generator=g, dtype=DTYPE)
    b = torch.randn(tuple(batch_shape), generator=g, dtype=DTYPE)
    return PlanarTransform(u, w, b, cache_size=0)


@pytest.mark.parametrize("batch_shape, z_shape", [((), (3,)), ((), (7, 3)), ((4,), (4, 3)),
                                                   ((4,), (6, 4, 3))])  # fmt: skip
def test_inverse_inverts_with_and_without_batch_dimensions(batch_shape, z_shape):
    t = _transform(batch_shape)
    z = torch.randn(*z_shape, dtype=DTYPE) * 2
    y = t(z)
    assert y.shape == z.shape
    torch.testing.assert_close(t.inv(y), z, rtol=0, atol=1e-9)
    assert t.log_abs_det_jacobian(z, y).shape == z_shape[:-1]


@pytest.mark.parametrize("batch_shape", [(), (5,)])
def test_log_det_equals_autograd_jacobian(batch_shape):
    t = _transform(batch_shape, seed=1)
    z = torch.randn(*batch_shape, 3, dtype=DTYPE)
    ladj = t.log_abs_det_jacobian(z, t(z))  # batch_shape
    jac = jacobian(t, z)  # (*batch, 3, *batch, 3): rows only depend on their own z
    if batch_shape:
        jac = torch.stack([jac[i, :, i, :] for i in range(batch_shape[0])])
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)


def test_map_is_invertible_even_when_u_opposes_w():
    """The u_hat correction keeps w^T u_hat >= -1, so det J > 0 everywhere."""
    w = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    u = torch.tensor([[-5.0, 3.0]], dtype=DTYPE)  # w^T u_hat = softplus(-5) - 1 = -0.993
    t = PlanarTransform(u, w, torch.zeros(1, dtype=DTYPE), cache_size=0)
    assert float((t.w * t.u_hat).sum()) >= -1
    z = torch.linspace(-5, 5, 101, dtype=DTYPE)[:, None, None].expand(101, 1, 2).contiguous()
    assert torch.isfinite(t.log_abs_det_jacobian(z, t(z))).all()
    torch.testing.assert_close(t.inv(t(z)), z, rtol=0, atol=1e-9)


def test_prior_init_is_the_standard_normal():
    family = PlanarFlow(3, layers=4)
    lam = family.prior_init(5, dtype=DTYPE)
    q = family.distribution(lam)
    z = torch.randn(8, 5, 3, dtype=DTYPE)
    reference = Independent(Normal(torch.zeros(3, dtype=DTYPE), 1.0), 1).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), reference, rtol=0, atol=1e-9)
    torch.testing.assert_close(family.mean(lam), torch.zeros(5, 3, dtype=DTYPE))


def test_log_prob_of_own_samples_matches_log_prob_after_inversion():
    family = PlanarFlow(3, layers=3)
    torch.manual_seed(0)
    lam = torch.randn(4, family.num_params, dtype=DTYPE) * 0.5
    q = family.distribution(lam)
    z = q.rsample((6,))
    cached = q.log_prob(z)  # uses the cached pre-image
    fresh = family.distribution(lam).log_prob(z.clone())  # inverts by bisection
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-8)


def test_planar_flow_beats_the_diagonal_gaussian_on_linear_gaussian():
    lg = LinearGaussian(scale=1.0, seed=2)  # diagonal approximation gap 0.191 nats
    x = lg.sample_x(60)
    exact = lg.log_px(x)
    gaps = {}
    for family in (DiagonalGaussian(3), PlanarFlow(3, layers=2)):
        torch.manual_seed(0)
        fit = fit_local(lg.model, family, x, steps=3000, lr=0.02, samples=16)
        with torch.no_grad():
            torch.manual_seed(1)
            gaps[family.name] = float((exact - elbo(lg.model, family, fit.lam, x, 4000)).mean())
    assert gaps["diagonal"] == pytest.approx(lg.diagonal_gap(), abs=0.03)
    assert gaps["planar"] < gaps["diagonal"] - 0.1
    assert gaps["planar"] > -0.02  # still a lower bound


def test_iwae_with_a_flow_proposal_is_a_valid_estimate():
    lg = LinearGaussian(scale=1.0, seed=2)
    x = lg.sample_x(20)
    family = PlanarFlow(3, layers=2)
    torch.manual_seed(0)
    fit = fit_local(lg.model, family, x, steps=300, lr=0.02, samples=8)
    with torch.no_grad():
        value = iwae_bound(lg.model, family, fit.lam, x, 3000, chunk_size=7)
    assert abs(float((value - lg.log_px(x)).mean())) < 0.05


def test_bad_layers():
    with pytest.raises(ValueError, match="layers"):
        PlanarFlow(3, layers=0)


# Inverse autoregressive flow: one network per datapoint, all of it in lam.


def _iaf_lam(family, batch_shape, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    lam = family.prior_init(1, dtype=DTYPE)[0]
    lam = lam + scale * torch.randn((*batch_shape, family.num_params), generator=g, dtype=DTYPE)
    return lam


@pytest.mark.parametrize("batch_shape, z_shape", [((), (3,)), ((), (7, 3)), ((4,), (4, 3)),
                                                   ((4,), (6, 4, 3))])  # fmt: skip
def test_iaf_inverse_inverts_with_and_without_batch_dimensions(batch_shape, z_shape):
    family = InverseAutoregressiveFlow(3, layers=2, hidden=5)
    lam = _iaf_lam(family, batch_shape)
    eps = torch.randn(*z_shape, dtype=DTYPE) * 2
    for t, fresh in zip(family.transforms(lam), family.transforms(lam), strict=True):
        y = t(eps)
        assert y.shape == eps.shape
        # ``fresh`` has no cached pre-image, so it inverts by D autoregressive passes
        torch.testing.assert_close(fresh.inv(y), eps, rtol=0, atol=1e-9)
        assert t.log_abs_det_jacobian(eps, y).shape == z_shape[:-1]


@pytest.mark.parametrize("batch_shape", [(), (5,)])
@pytest.mark.parametrize("step", [0, 1])
def test_iaf_jacobian_is_triangular_and_log_det_equals_autograd(batch_shape, step):
    family = InverseAutoregressiveFlow(4, layers=2, hidden=6)
    lam = _iaf_lam(family, batch_shape, seed=3)
    t = family.transforms(lam)[step]
    eps = torch.randn(*batch_shape, 4, dtype=DTYPE)
    ladj = t.log_abs_det_jacobian(eps, t(eps))
    jac = jacobian(t, eps)
    if batch_shape:
        jac = torch.stack([jac[i, :, i, :] for i in range(batch_shape[0])])
    # step 0 is autoregressive in the order 1..D, step 1 in the reversed order
    upper = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    zero = upper if step == 0 else upper.T
    assert (jac[..., zero] == 0).all()
    assert (jac[..., ~zero].abs() > 0).any()
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)


def test_made_masks_allow_only_lower_degree_paths():
    for d, h in ((1, 3), (2, 1), (5, 8)):
        m1, m2 = made_masks(d, h)
        paths = (m2 @ m1) > 0  # (2D, D): output o reaches input i
        allowed = torch.tril(torch.ones(d, d, dtype=torch.bool), diagonal=-1).repeat(2, 1)
        assert not (paths & ~allowed).any()
        if d > 1:  # with enough hidden units every allowed path exists
            full = made_masks(d, 4 * d)
            assert ((full[1] @ full[0] > 0) == allowed).all()


def test_iaf_from_gaussian_is_that_gaussian_and_log_prob_of_own_samples_matches():
    family = InverseAutoregressiveFlow(3, layers=2, hidden=4)
    loc = torch.randn(5, 3, dtype=DTYPE)
    log_scale = torch.randn(5, 3, dtype=DTYPE) * 0.3
    q = family.distribution(family.from_gaussian(loc, log_scale))
    z = torch.randn(8, 5, 3, dtype=DTYPE)
    reference = Independent(Normal(loc, log_scale.exp()), 1).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), reference, rtol=0, atol=1e-9)
    prior = family.distribution(family.prior_init(5, dtype=DTYPE))
    torch.testing.assert_close(
        prior.log_prob(z), Independent(Normal(torch.zeros(3, dtype=DTYPE), 1.0), 1).log_prob(z)
    )
    lam = _iaf_lam(family, (5,), seed=4)
    q = family.distribution(lam)
    z = q.rsample((6,))
    fresh = family.distribution(lam).log_prob(z.clone())  # inverted, not cached
    torch.testing.assert_close(q.log_prob(z), fresh, rtol=0, atol=1e-8)


def test_iaf_encoder_shares_the_flow_weights_and_starts_at_its_base_gaussian():
    family = InverseAutoregressiveFlow(3, layers=2, hidden=4)
    torch.manual_seed(0)
    encoder = MLPEncoder(6, family, hidden=(8,))
    x = torch.randn(5, 6)
    lam = encoder(x)
    assert lam.shape == (5, family.num_params)
    d = 3
    shared = lam[:, 2 * d :].unflatten(-1, (2, -1))[..., : family.layout.sizes["w1"]]
    assert (shared == shared[:1]).all()  # W1 is the same row for every x
    assert not (lam[:, : 2 * d] == lam[:1, : 2 * d]).all()  # mu, log sigma depend on x
    # At initialisation every step is the identity: q is the encoder's base Gaussian.
    z = torch.randn(7, 5, 3)
    base = Independent(Normal(lam[:, :d], lam[:, d : 2 * d].exp()), 1)
    torch.testing.assert_close(family.distribution(lam).log_prob(z), base.log_prob(z))
    # Shared weights learn: the ELBO's gradient reaches them.
    loss = -family.distribution(lam).rsample((4,)).square().sum()
    loss.backward()
    head = encoder.net[-1]
    assert head.w2.grad.abs().sum() > 0 and head.w1.grad is not None


def test_iaf_beats_the_diagonal_gaussian_on_linear_gaussian():
    lg = LinearGaussian(scale=1.0, seed=2)  # diagonal approximation gap 0.191 nats
    x = lg.sample_x(60)
    exact = lg.log_px(x)
    family = InverseAutoregressiveFlow(3, layers=2, hidden=6)
    torch.manual_seed(0)
    fit = fit_local(lg.model, family, x, steps=3000, lr=0.02, samples=16)
    with torch.no_grad():
        torch.manual_seed(1)
        gap = float((exact - elbo(lg.model, family, fit.lam, x, 4000)).mean())
    assert gap < lg.diagonal_gap() - 0.1
    assert gap > -0.02  # still a lower bound


def test_gaussian_moments_recover_a_gaussian_and_warm_start_other_families():
    loc = torch.randn(4, 3, dtype=DTYPE)
    log_scale = torch.randn(4, 3, dtype=DTYPE) * 0.3
    diag = DiagonalGaussian(3)
    lam = diag.from_gaussian(loc, log_scale)
    torch.testing.assert_close(diag.gaussian_moments(lam), (loc, log_scale))
    for family in (PlanarFlow(3), InverseAutoregressiveFlow(3, hidden=4)):
        torch.manual_seed(0)
        m, s = family.gaussian_moments(family.from_gaussian(loc, log_scale), samples=20000)
        torch.testing.assert_close(m, loc, rtol=0, atol=0.05)
        torch.testing.assert_close(s, log_scale, rtol=0, atol=0.03)


@pytest.mark.parametrize("family", [
    PlanarFlow(3, layers=2),
    InverseAutoregressiveFlow(3, hidden=4),
    InverseAutoregressiveFlow(3, hidden=4, acts_on="latent"),
])  # fmt: skip
def test_a_flow_and_its_inverses_are_freed_without_the_cycle_collector(family):
    import gc
    import weakref

    lam = family.prior_init(5) + 0.1 * torch.randn(5, family.num_params)
    gc.collect()
    gc.disable()
    try:
        q = family.distribution(lam)
        maps = [weakref.ref(t) for t in q.transforms]
        z = q.rsample((2,))
        q.log_prob(z)  # the inverse of every map, from its cache
        q.log_prob(z.detach().clone())  # and computed afresh
        del q, z
        assert all(m() is None for m in maps)  # no transform left in a reference cycle
    finally:
        gc.enable()


def test_the_allocator_is_tuned_where_the_c_library_is_glibc():
    import platform

    from amortized.memory import tune_allocator

    assert tune_allocator() is (platform.libc_ver()[0] == "glibc")
