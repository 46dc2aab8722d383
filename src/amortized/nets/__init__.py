"""Networks: encoders x -> lambda(x), decoders z -> p(x | z), and the VQ-VAE.

- ``layers``: the MLP and activations every network is built from;
- ``encoders``, ``conv``: MLP and convolutional encoders (and a conv decoder);
- ``decoders``: MLP decoders with Bernoulli or Gaussian likelihoods;
- ``autoregressive``, ``pixelcnn``: autoregressive decoders (MADE, gated PixelCNN);
- ``vqvae``: the VQ-VAE and its autoregressive code prior.
"""

from .decoders import BernoulliMLPDecoder, GaussianMLPDecoder
from .encoders import MLPEncoder

__all__ = ["BernoulliMLPDecoder", "GaussianMLPDecoder", "MLPEncoder"]
