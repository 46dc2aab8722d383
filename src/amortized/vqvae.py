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
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize

from .decoders import BernoulliMLPDecoder
from .fit import fit_epochs
from .nn import adam, mlp

__all__ = ["VQVAE", "CodePrior", "codebook_perplexity", "fit"]

FIT_FORMAT = "amortized-fit-v1"


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


def fit(
    module: nn.Module,
    loss: Callable[[Tensor], Tensor],
    train_x: Tensor,
    valid_score: Callable[[], dict[str, float]],
    run_dir: str | Path,
    *,
    epochs: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[dict]:
    """Adam on ``loss(batch)`` for ``epochs`` epochs over ``train_x``; resumable.

    The epochs run through the project's one resumable loop (:func:`amortized.fit.fit_epochs`):
    after every epoch ``valid_score()`` is logged to ``run_dir/metrics.jsonl`` and
    everything needed to resume (weights and buffers such as the EMA codebook, optimiser,
    random streams) is written atomically to ``run_dir/checkpoint.pt``; run the same call
    again after a kill and it carries on from the last finished epoch. Returns the log.
    Used for the VQ-VAE (its loss) and for the code prior (the codes' negative log-prior).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    epochs_run = _AdamEpochs(module, loss, train_x, valid_score, epochs, batch_size, lr, seed)
    fit_epochs(epochs_run, run_dir, checkpoint_format=FIT_FORMAT)
    module.eval()
    return list(epochs_run.log)


class _AdamEpochs:
    """Plain Adam epochs over shuffled minibatches, for :func:`amortized.fit.fit_epochs`."""

    def __init__(self, module, loss, train_x, valid_score, epochs, batch_size, lr, seed):
        self.module, self.loss, self.train_x, self.valid_score = module, loss, train_x, valid_score
        self.epochs, self.batch_size = epochs, batch_size
        self.optimizer = adam(module.parameters(), lr)
        self.order = torch.Generator().manual_seed(seed)
        self.epoch, self.log = 0, []

    def done(self) -> bool:
        return self.epoch >= self.epochs

    def run_epoch(self) -> dict:
        start = time.perf_counter()
        self.module.train()
        total = 0.0
        for idx in torch.randperm(self.train_x.shape[0], generator=self.order).split(
            self.batch_size
        ):
            value = self.loss(self.train_x[idx.to(self.train_x.device)])
            self.optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.optimizer.step()
            total += float(value.detach()) * len(idx)
        self.module.eval()
        self.epoch += 1
        record = {"epoch": self.epoch, "train_loss": total / self.train_x.shape[0],
                  **self.valid_score()}  # fmt: skip
        self.log.append(record | {"seconds": time.perf_counter() - start})
        return self.log[-1]

    def state(self) -> dict:
        return {"module": self.module.state_dict(), "epoch": self.epoch, "log": self.log,
                "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                "order": self.order.get_state()}  # fmt: skip

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.order.set_state(state["order"])
        self.epoch, self.log = state["epoch"], state["log"]
