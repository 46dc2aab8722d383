"""A Pyro VAE for `amortized gap --model examples/pyro_vae.py:build`.

Pyro's VAE tutorial model and guide (784-400-50 networks, softplus), turned into this
library's model, encoder and family by `amortized.adapters.from_pyro`. Train it with
Pyro's SVI as usual, save `vae.state_dict()`, and load it in `build`; untrained, as here,
it still shows every gap of the report.
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from amortized.adapters import from_pyro

LATENT, HIDDEN = 50, 400


class VAE(nn.Module):
    def __init__(self, data_dim: int):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Softplus(),
                                     nn.Linear(HIDDEN, data_dim))  # fmt: skip
        self.encoder = nn.Sequential(nn.Linear(data_dim, HIDDEN), nn.Softplus(),
                                     nn.Linear(HIDDEN, 2 * LATENT))  # fmt: skip

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(x.shape[0], LATENT)
            z = pyro.sample("latent", dist.Normal(z_loc, torch.ones_like(z_loc)).to_event(1))
            logits = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
                        obs=x)  # fmt: skip

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            out = self.encoder(x)
            loc, scale = out[:, :LATENT], out[:, LATENT:].exp()
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def build(data_dim: int):
    vae = VAE(data_dim)
    # vae.load_state_dict(torch.load("my_pyro_vae.pt"))  # a trained one
    return from_pyro(vae.model, vae.guide, data_dim)
