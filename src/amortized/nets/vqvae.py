r"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017): discrete codes for binary images.

The encoder maps x to M vectors z_e(x) in R^d; each is replaced by its nearest entry of a
codebook of K vectors, c_m(x) = argmin_k ||z_e,m(x) - e_k||, and the decoder models
p(x | e_c(x)). Gradients pass the quantizer straight through (z_e + sg(e - z_e)); the
codebook follows the encoder outputs assigned to it by exponential moving averages, and a
code that no encoder output has chosen for a while is restarted at a random encoder
output (vector-quantize-pytorch's ``VectorQuantize`` does both). The encoder is held near
its codes by the commitment loss beta ||z_e - sg(e)||^2 (beta = 0.25).

As a latent-variable model with discrete z = c and a point-mass q(c | x) (entropy 0),
the ELBO is log p(x | c(x)) + log p(c(x)) <= log p(x):

- with a uniform prior over codes, log p(c) = -M log K;
- with a learned autoregressive prior over the code sequence (:class:`CodePrior`, fitted
  to the training set's codes after the VQ-VAE), log p(c) = sum_m log p(c_m | c_<m).

Either bound sits in the same NLL table as the continuous models' bounds. Codebook use is
reported as the perplexity exp(H) of the empirical code distribution (K when every code
is used equally, 1 when one code takes everything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize

from .decoders import BernoulliMLPDecoder
from .layers import mlp

__all__ = ["VQVAE", "CodePrior", "codebook_perplexity"]


def codebook_perplexity(codes: Tensor, codebook_size: int) -> tuple[float, int]:
    """exp(entropy) of the empirical distribution of ``codes`` and the number of codes used."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), int((counts > 0).sum())


class VQVAE(nn.Module):
    """MLP encoder to M codes of dimension d from a K-entry codebook, Bernoulli MLP decoder.

    Example:
        >>> vq = VQVAE(data_dim=6, latents=2, code_dim=3, codebook_size=4, hidden=(8,))
        >>> out = vq(torch.ones(5, 6))
        >>> out["log_likelihood"].shape, out["codes"].shape
        (torch.Size([5]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        data_dim: int,
        latents: int = 16,
        code_dim: int = 16,
        codebook_size: int = 64,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        commitment: float = 0.25,
        decay: float = 0.99,
        dead_code_threshold: float = 1.0,
    ):
        super().__init__()
        self.data_dim, self.latents, self.code_dim = data_dim, latents, code_dim
        self.codebook_size, self.commitment = codebook_size, commitment
        self.encoder = mlp(data_dim, hidden, latents * code_dim, activation)
        self.quantizer = VectorQuantize(
            dim=code_dim,
            codebook_size=codebook_size,
            decay=decay,
            commitment_weight=0.0,  # ours below, summed like the log-likelihood
            threshold_ema_dead_code=dead_code_threshold,
            rotation_trick=False,  # the paper's straight-through estimator
        )
        self.decoder = BernoulliMLPDecoder(latents * code_dim, data_dim, hidden, activation)

    def encode(self, x: Tensor) -> Tensor:
        """z_e(x), ``(batch, M, d)``."""
        return self.encoder(x).reshape(x.shape[0], self.latents, self.code_dim)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """c(x), ``(batch, M)``: the index of each latent's nearest codebook entry."""
        distances = torch.cdist(self.encode(x), self.quantizer.codebook.unsqueeze(0))
        return distances.argmin(-1)

    def decode(self, codes: Tensor):
        """p(x | c) for codes ``(batch, M)``."""
        e = self.quantizer.codebook[codes]  # (batch, M, d)
        return self.decoder(e.reshape(codes.shape[0], -1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """log p(x | c(x)) and the commitment loss per datapoint ``(batch,)``, and the codes.

        In training mode the quantizer also moves the codebook (EMA) and restarts dead codes.
        """
        z_e = self.encode(x)
        quantized, codes, _ = self.quantizer(z_e)  # straight through: grads reach z_e
        commitment = (z_e - quantized.detach()).square().sum((-1, -2))
        log_likelihood = self.decoder(quantized.reshape(x.shape[0], -1)).log_prob(x)
        return {"log_likelihood": log_likelihood, "commitment": commitment, "codes": codes}

    def loss(self, x: Tensor) -> Tensor:
        """The training loss, mean over the batch: -log p(x | c(x)) + beta ||z_e - sg(e)||^2."""
        out = self(x)
        return (self.commitment * out["commitment"] - out["log_likelihood"]).mean()

    @torch.no_grad()
    def bound(self, x: Tensor, prior: CodePrior | None = None) -> Tensor:
        """log p(x | c(x)) + log p(c(x)) per datapoint: uniform prior, or ``prior``'s."""
        codes = self.codes(x)
        log_likelihood = self.decode(codes).log_prob(x)
        if prior is None:
            return log_likelihood - self.latents * math.log(self.codebook_size)
        return log_likelihood + prior.log_prob(codes)


class CodePrior(nn.Module):
    """An autoregressive prior over code sequences, p(c) = prod_m p(c_m | c_<m) (a GRU).

    Example:
        >>> prior = CodePrior(codebook_size=4, latents=3, hidden=8)
        >>> prior.log_prob(torch.tensor([[0, 1, 3]])).shape
        torch.Size([1])
    """

    def __init__(self, codebook_size: int, latents: int, hidden: int = 128):
        super().__init__()
        self.codebook_size, self.latents = codebook_size, latents
        self.embed = nn.Embedding(codebook_size + 1, hidden)  # the extra entry starts a sequence
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, codebook_size)

    def logits(self, codes: Tensor) -> Tensor:
        """Logits of c_m given c_<m for every m: ``(batch, M, K)``."""
        start = torch.full_like(codes[:, :1], self.codebook_size)
        inputs = torch.cat([start, codes[:, :-1]], dim=1)
        hidden, _ = self.rnn(self.embed(inputs))
        return self.out(hidden)

    def log_prob(self, codes: Tensor) -> Tensor:
        """log p(c) per sequence, ``(batch,)``."""
        logits = self.logits(codes)
        return -F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").sum(-1)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n code sequences ``(n, M)``, one position at a time."""
        codes = torch.zeros(n, 0, dtype=torch.long, device=self.out.weight.device)
        for _ in range(self.latents):
            padded = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
            probs = self.logits(padded)[:, -1].softmax(-1)
            codes = torch.cat([codes, torch.multinomial(probs, 1)], dim=1)
        return codes
