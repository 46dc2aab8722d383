"""LatentVariableModel and the ready-made decoders and encoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, MultivariateNormal, Normal

from amortized import (
    BernoulliMLPDecoder,
    DiagonalGaussian,
    GaussianMLPDecoder,
    LatentVariableModel,
    MLPEncoder,
)
from amortized.nets.decoders import LogitBernoulli


def test_log_joint_is_prior_plus_likelihood():
    torch.manual_seed(0)
    decoder = BernoulliMLPDecoder(3, 8, hidden=(5,))
    model = LatentVariableModel(decoder, 3)
    x = (torch.rand(4, 8) < 0.5).float()
    z = torch.randn(7, 4, 3)  # (samples, batch, latent)
    logits = decoder.net(z)
    manual = Normal(0.0, 1.0).log_prob(z).sum(-1) + (
        x * logits.sigmoid().log() + (1 - x) * (1 - logits.sigmoid()).log()
    ).sum(-1)
    assert model.log_joint(x, z).shape == (7, 4)
    assert torch.allclose(model.log_joint(x, z), manual, atol=1e-4)
    assert model.log_joint(x, z[0]).shape == (4,)


def test_logit_bernoulli_matches_torch_bernoulli_and_its_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 10, dtype=torch.float64) * 8).requires_grad_(True)
    x = (torch.rand(5, 10) < 0.4).double()
    ours = Independent(LogitBernoulli(logits), 1).log_prob(x)
    ref = Independent(Bernoulli(logits=logits), 1).log_prob(x)
    assert torch.allclose(ours, ref, atol=1e-10)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    # softplus is linear above 20, which errs by log1p(exp(-20)) < 3e-9 per element
    assert torch.allclose(g_ours, g_ref, atol=1e-8)


def test_gaussian_decoder_fixed_and_learned_scale():
    fixed = GaussianMLPDecoder(2, 4, hidden=(3,), scale=0.5)
    learned = GaussianMLPDecoder(2, 4, hidden=(3,))
    assert "log_scale" not in dict(fixed.named_parameters())
    assert "log_scale" in dict(learned.named_parameters())
    assert torch.allclose(fixed(torch.zeros(2)).base_dist.scale, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="scale must be positive"):
        GaussianMLPDecoder(2, 4, scale=0.0)


def test_custom_prior_and_sampling_shapes():
    prior = MultivariateNormal(torch.ones(2), covariance_matrix=2 * torch.eye(2))
    model = LatentVariableModel(GaussianMLPDecoder(2, 3, hidden=(4,), scale=1.0), 2, prior=prior)
    assert model.prior is prior
    assert model.sample(6).shape == (6, 3)
    assert model.sample(6, mean=True).shape == (6, 3)
    with pytest.raises(ValueError, match="event_shape"):
        LatentVariableModel(GaussianMLPDecoder(2, 3), 2, prior=Normal(0.0, 1.0))


def test_default_prior_follows_the_device_and_dtype():
    model = LatentVariableModel(BernoulliMLPDecoder(2, 3, hidden=(4,)), 2).double()
    assert model.prior.sample().dtype == torch.float64


class NotADistribution(nn.Module):
    def forward(self, z):
        return z


class FlatOnly(nn.Module):
    """A decoder that ignores the sample axis: batch_shape is wrong for (S, B, D) input."""

    def forward(self, z):
        return Independent(Normal(z.reshape(-1, z.shape[-1]), 1.0), 1)


def test_decoder_contract_errors_are_clear():
    with pytest.raises(TypeError, match="must return a torch.distributions.Distribution"):
        LatentVariableModel(NotADistribution(), 2).log_joint(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="batch_shape"):
        LatentVariableModel(FlatOnly(), 2).log_joint(torch.zeros(3, 2), torch.zeros(4, 3, 2))
    model = LatentVariableModel(BernoulliMLPDecoder(2, 6, hidden=(4,)), 2)
    with pytest.raises(ValueError, match=r"reshape x to \(batch, 6\)"):
        model.log_joint(torch.zeros(3, 2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="latent_dim=2"):
        model.log_joint(torch.zeros(3, 6), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="latent_dim"):
        LatentVariableModel(BernoulliMLPDecoder(2, 6), 0)


def test_encoder_output_shape_and_input_check():
    family = DiagonalGaussian(4)
    encoder = MLPEncoder(12, family, hidden=(8, 8))
    assert encoder(torch.zeros(5, 3, 4)).shape == (5, 8)  # image-shaped x is flattened
    with pytest.raises(ValueError, match="expects 12 values"):
        encoder(torch.zeros(5, 10))
    with pytest.raises(ValueError, match="unknown activation"):
        MLPEncoder(12, family, activation="swish")


def test_the_fast_tanh_matches_torch_tanh_in_value_gradient_and_curvature():
    from amortized.nets.layers import FAST_TANH_ELEMENTS, tanh

    x = torch.cat([torch.linspace(-40.0, 40.0, FAST_TANH_ELEMENTS),
                   torch.tensor([0.0, -0.0, 1e-30, float("inf"), -float("inf")])])  # fmt: skip
    y = tanh(x)
    assert (y[:-2] - torch.tanh(x[:-2])).abs().max() < 3e-7
    assert y[-2] == 1.0 and y[-1] == -1.0 and torch.isnan(tanh(x.clone().fill_(math.nan))).all()
    small = torch.randn(10)  # below the size where the sigmoid form pays: torch's own
    assert torch.equal(tanh(small), torch.tanh(small))

    a = torch.randn(FAST_TANH_ELEMENTS, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(tanh(a).sum(), a, create_graph=True)
    assert torch.allclose(g, 1 - torch.tanh(a).square(), atol=1e-14, rtol=0)
    (h,) = torch.autograd.grad(g.sum(), a)  # d2 tanh = -2 tanh (1 - tanh^2)
    t = torch.tanh(a)
    assert torch.allclose(h, -2 * t * (1 - t.square()), atol=1e-14, rtol=0)
    b = a.detach()[:20].clone().requires_grad_(True)  # the autograd function, checked alone
    from amortized.nets.layers import _SigmoidTanh

    assert torch.autograd.gradgradcheck(_SigmoidTanh.apply, (b,))
