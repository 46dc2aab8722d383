"""Convolutional encoder and decoder: shapes, receptive fields, training, bad shapes."""

from __future__ import annotations

import pytest
import torch

from amortized import DiagonalGaussian, LatentVariableModel, elbo
from amortized.config import ConfigError, TrainConfig
from amortized.data import Dataset, load_dataset
from amortized.nets.conv import ConvDecoder, ConvEncoder
from amortized.train import build, load_run, read_metrics, train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_encoder_sees_every_pixel_and_the_decoder_every_latent():
    torch.manual_seed(0)
    family = DiagonalGaussian(3)
    encoder = ConvEncoder((8, 12), family, channels=(4, 8), hidden=(16,), activation="tanh")
    x = torch.rand(1, 96, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: encoder.double()(v)[0], x)[:, 0, :]
    assert jac.shape == (6, 96) and bool((jac.abs().sum(0) > 0).all())  # no pixel ignored
    decoder = ConvDecoder(3, (8, 12), channels=(4, 8), activation="tanh").double()
    z = torch.randn(1, 3, dtype=torch.float64)
    logits = torch.autograd.functional.jacobian(lambda v: decoder(v).base_dist.logits[0], z)
    assert bool((logits[:, 0, :].abs().sum(1) > 0).all())  # every pixel depends on z


def test_decoders_follow_the_shape_convention_and_score_like_bernoulli():
    torch.manual_seed(0)
    decoder = ConvDecoder(2, (8, 8), channels=(4, 8))
    model = LatentVariableModel(decoder, 2)
    x = torch.bernoulli(torch.full((5, 64), 0.5))
    z = torch.randn(7, 5, 2)
    joint = model.log_likelihood(x, z)
    assert joint.shape == (7, 5)
    logits = decoder(z[3, 1]).base_dist.logits
    by_hand = torch.distributions.Bernoulli(logits=logits).log_prob(x[1]).sum()
    assert float(joint[3, 1]) == pytest.approx(float(by_hand), abs=1e-4)
    gaussian = ConvDecoder(2, (8, 8), channels=(4,), likelihood="gaussian")
    assert gaussian(z).log_prob(torch.randn(5, 64)).shape == (7, 5)


def test_shapes_that_do_not_halve_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvEncoder((28, 30), DiagonalGaussian(2), channels=(4, 8))
    with pytest.raises(ValueError, match="divisible by 8"):
        ConvDecoder(2, (28, 28), channels=(4, 8, 16))
    with pytest.raises(ValueError, match="height, width"):
        ConvDecoder(2, (784,))


@pytest.fixture(scope="module")
def tiny(single_thread):
    full = load_dataset("mnist5k")
    return Dataset("tiny", full.train[:300], full.valid[:100], full.test[:100], "dynamic", (28, 28))


def test_a_conv_vae_trains_and_reloads(tiny, tmp_path):
    config = TrainConfig(encoder="conv", decoder="conv", conv_channels=(4, 8), hidden=(32,),
                         latent_dim=2, epochs=3, batch_size=50, progress=False)  # fmt: skip
    trained = train(config, tmp_path / "run", dataset=tiny)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["valid_elbo"] > metrics[0]["valid_elbo"]
    loaded = load_run(tmp_path / "run")
    x = tiny.valid[:5].round()
    torch.manual_seed(0)
    a = elbo(trained.model, trained.family, trained.encoder(x), x, 4)
    torch.manual_seed(0)
    b = elbo(loaded.model, loaded.family, loaded.encoder(x), x, 4)
    assert torch.equal(a, b)


def test_conv_settings_that_cannot_work_are_config_errors(tiny):
    flat = Dataset("flat", tiny.train, tiny.valid, tiny.test, "dynamic", None)
    with pytest.raises(ConfigError, match="conv encoder needs images"):
        build(TrainConfig(encoder="conv"), 784, None)
    with pytest.raises(ConfigError, match="conv decoder needs images"):
        build(TrainConfig(decoder="conv"), flat.data_dim, flat.image_shape)
    with pytest.raises(ConfigError, match="divisible by 8"):
        build(TrainConfig(encoder="conv", conv_channels=(4, 4, 4)), 784, (28, 28))
    with pytest.raises(ConfigError, match="encoder must be mlp"):
        build(TrainConfig(encoder="conv", inference="iterative"), 784, (28, 28))
    with pytest.raises(ConfigError, match="encoder must be one of"):
        build(TrainConfig(encoder="resnet"), 784, (28, 28))
