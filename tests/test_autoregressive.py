"""The autoregressive decoders (gated PixelCNN, MADE): causal, no blind spot, normalised,
and sampled correctly."""

import itertools

import pytest
import torch

from amortized import LatentVariableModel
from amortized.config import ConfigError, TrainConfig
from amortized.nets.autoregressive import MADEDecoder, WithoutLatent
from amortized.nets.pixelcnn import GatedPixelCNNDecoder
from amortized.train import build


def pixelcnn(latent_dim, shape, **kwargs):
    return GatedPixelCNNDecoder(latent_dim, shape, **{"channels": 8, "layers": 3, "kernel": 3,
                                                      **kwargs})  # fmt: skip


def made(latent_dim, shape, hidden=(16, 16)):
    return MADEDecoder(latent_dim, shape[0] * shape[1], hidden=hidden)


DECODERS = [pixelcnn, made]


def _dependence(decoder, shape, z):
    """|d logit_i / d x_j| summed over random binary images, (pixels, pixels)."""
    n = shape[0] * shape[1]
    total = torch.zeros(n, n)
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.bernoulli(torch.full((1, n), 0.5, dtype=torch.float64))
        jac = torch.autograd.functional.jacobian(lambda v: decoder.logits(v, z)[0], x)
        total += jac[:, 0, :].abs()
    return total


@pytest.mark.parametrize("kernel", [3, 5])
def test_each_logit_depends_on_every_earlier_pixel_and_no_later_one(kernel):
    torch.manual_seed(0)
    shape = (5, 6)
    decoder = GatedPixelCNNDecoder(3, shape, channels=8, layers=6, kernel=kernel).double()
    dep = _dependence(decoder, shape, torch.randn(1, 3, dtype=torch.float64))
    n = shape[0] * shape[1]
    later = torch.triu(torch.ones(n, n, dtype=torch.bool))  # j >= i: must not matter
    assert float(dep[later].max()) == 0.0
    # no blind spot: every earlier pixel matters (rows far above and columns to the right)
    assert bool((dep[~later] > 0).all()), (dep[~later] == 0).nonzero()[:5]


@pytest.mark.parametrize("hidden", [(7,), (40, 40), (3, 50)])
def test_made_logit_depends_on_every_earlier_input_and_no_later_one(hidden):
    torch.manual_seed(0)
    shape = (5, 6)
    decoder = MADEDecoder(3, 30, hidden=hidden, activation="tanh").double()  # no dead ReLUs
    dep = _dependence(decoder, shape, torch.randn(1, 3, dtype=torch.float64))
    later = torch.triu(torch.ones(30, 30, dtype=torch.bool))
    assert float(dep[later].max()) == 0.0
    assert bool((dep[~later] > 0).all())
    # the hidden units carry z to every logit, the first one included
    z = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    x = torch.bernoulli(torch.full((1, 30), 0.5, dtype=torch.float64))
    jac = torch.autograd.functional.jacobian(lambda v: decoder.logits(x, v)[0], z)
    assert bool((jac[:, 0, :].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("make", DECODERS)
def test_log_probabilities_of_all_images_sum_to_one_and_depend_on_z(make):
    torch.manual_seed(0)
    decoder = make(2, (2, 3))
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)))  # (64, 6)
    for z in (torch.zeros(2), torch.tensor([2.0, -1.0])):
        log_p = decoder(z.expand(64, 2)).log_prob(images)
        assert float(torch.logsumexp(log_p, 0)) == pytest.approx(0.0, abs=1e-5)
    a = decoder(torch.zeros(64, 2)).log_prob(images)
    b = decoder(torch.full((64, 2), 3.0)).log_prob(images)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("make", DECODERS)
def test_samples_follow_the_model_s_probabilities(make):
    torch.manual_seed(0)
    decoder = make(2, (2, 2))
    z = torch.tensor([0.5, -0.5])
    px = decoder(z)
    draws = px.sample((20000,))  # (20000, 4)
    assert draws.shape == (20000, 4)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))
    with torch.no_grad():
        p = px.log_prob(images).exp()  # (16,)
    codes = (draws * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(1).long()
    freq = torch.bincount(codes, minlength=16) / 20000.0
    # binomial standard error at n = 20000 is at most 0.0036: allow 5 of them
    assert torch.allclose(freq, p, atol=0.018)


@pytest.mark.parametrize("make", DECODERS)
def test_it_serves_as_the_model_s_decoder_with_sample_axes(make):
    torch.manual_seed(0)
    decoder = make(2, (3, 3))
    model = LatentVariableModel(decoder, 2)
    x = torch.bernoulli(torch.full((5, 9), 0.5))
    z = torch.randn(7, 5, 2)
    joint = model.log_likelihood(x, z)
    assert joint.shape == (7, 5)
    by_hand = decoder(z[3, 1]).log_prob(x[1])
    assert float(joint[3, 1]) == pytest.approx(float(by_hand), abs=1e-5)
    assert model.sample(4).shape == (4, 9)
    with pytest.raises(NotImplementedError, match="no closed-form mean"):
        _ = decoder(z).mean


@pytest.mark.parametrize("make", DECODERS)
def test_without_latent_is_the_network_at_z_zero_for_every_z(make):
    torch.manual_seed(0)
    network = make(2, (2, 3))
    decoder = WithoutLatent(network)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)))  # (64, 6)
    reference = network(torch.zeros(64, 2)).log_prob(images)
    for z in (torch.zeros(64, 2), torch.full((64, 2), 3.0), torch.randn(64, 2)):
        log_p = decoder(z).log_prob(images)
        assert torch.equal(log_p, reference)
        assert float(torch.logsumexp(log_p, 0)) == pytest.approx(0.0, abs=1e-5)


def test_the_config_builds_a_decoder_without_latent_only_for_autoregressive_decoders():
    config = TrainConfig(decoder="made", made_hidden=(8,), latent_dim=2, decoder_uses_z=False)
    model, _, _ = build(config, 9, (3, 3))
    assert isinstance(model.decoder, WithoutLatent)
    assert isinstance(model.decoder.network, MADEDecoder)
    with pytest.raises(ConfigError, match="decoder_uses_z"):
        build(TrainConfig(decoder="mlp", decoder_uses_z=False), 9, (3, 3))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="image_shape"):
        GatedPixelCNNDecoder(2, (784,))
    with pytest.raises(ValueError, match="kernel"):
        GatedPixelCNNDecoder(2, (28, 28), kernel=4)
    with pytest.raises(ValueError, match="hidden sizes"):
        MADEDecoder(2, 784, hidden=())
