"""A model of your own for `amortized gap --model examples/my_model.py:build`.

`build(data_dim)` returns (model, encoder, family): here a Bernoulli decoder and an MLP
encoder, each with one hidden layer of 64 tanh units, and a diagonal Gaussian q over 8
latents. Any decoder works that maps z, shape (..., batch, latent_dim), to a
torch.distributions.Distribution over x with batch shape (..., batch); any encoder that
maps x, (batch, data_dim), to the family's parameters, (batch, family.num_params).
"""

from torch import nn
from torch.distributions import Bernoulli, Independent

from amortized import DiagonalGaussian, LatentVariableModel

LATENT = 8


class Decoder(nn.Module):
    """p(x | z): independent Bernoulli pixels with logits from a small MLP."""

    def __init__(self, data_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT, 64), nn.Tanh(), nn.Linear(64, data_dim))

    def forward(self, z):
        return Independent(Bernoulli(logits=self.net(z)), 1)


def build(data_dim: int):
    family = DiagonalGaussian(LATENT)
    encoder = nn.Sequential(nn.Linear(data_dim, 64), nn.Tanh(),
                            nn.Linear(64, family.num_params))  # fmt: skip
    return LatentVariableModel(Decoder(data_dim), LATENT), encoder, family
