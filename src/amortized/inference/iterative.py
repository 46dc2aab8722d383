r"""Iterative amortized inference (Marino, Yue & Mandt 2018): a learned optimiser of lambda.

Where an encoder maps x to lambda in one pass and :func:`amortized.refine` improves
lambda by gradient steps with a fixed rule, iterative amortized inference learns the
rule. An update network reads the current lambda_t, the ELBO's gradient with respect to
it, and optionally x, and proposes a new lambda through a gated (highway) update:

    lambda_{t+1} = sigma(a_t) * lambda_t + (1 - sigma(a_t)) * delta_t,
    (delta_t, a_t) = f_phi(lambda_t, normalise(grad_t), x),

for T iterations from the prior or from an encoder's output (``start="encoder"``: an
MLP gives lambda_0, trained through the updates). The network is trained with the model on
the ELBO of every iterate, averaged over iterations, so each step learns to improve the
bound. Gradient inputs are detached (the update network sees them as data, as in the
paper), so training needs first-order gradients only.

:class:`IterativeEncoder` is an ``nn.Module`` from x to lambda like any encoder, so the
gap report, the refinement curve and the study use it unchanged; it holds a reference to
the model, whose ELBO gradients it reads.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import IterativeStart
from ..families import VariationalFamily
from ..model import LatentVariableModel
from ..nets.encoders import MLPEncoder, flat_data
from ..nets.layers import mlp
from .optimiser import elbo_and_grad

__all__ = ["IterativeEncoder"]

STARTS = typing.get_args(IterativeStart)  # ("prior", "encoder"), declared in config.py


class IterativeEncoder(nn.Module):
    """x -> lambda_T by T learned, gated updates of lambda from the prior or an encoder.

    Arguments:
        model: the generative model whose ELBO gradients the updates read (not a
            submodule: its parameters belong to the model).
        family: the variational family of lambda.
        data_dim: size of flat x.
        iterations: T, the number of updates (the paper uses 5).
        hidden: hidden layers of the update network.
        use_x: whether the update network also reads x (the paper's "with data" variant).
        samples: draws per ELBO gradient.
        start: ``"prior"`` (lambda_0 is the prior) or ``"encoder"`` (lambda_0 = an MLP
            encoder's output with the same hidden layers, learned jointly).

    Example:
        >>> import torch
        >>> from amortized import LatentVariableModel, DiagonalGaussian
        >>> from amortized.nets.decoders import BernoulliMLPDecoder
        >>> model = LatentVariableModel(BernoulliMLPDecoder(2, 6, hidden=(8,)), 2)
        >>> enc = IterativeEncoder(model, DiagonalGaussian(2), 6, iterations=3, hidden=(8,))
        >>> enc(torch.ones(5, 6)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        model: LatentVariableModel,
        family: VariationalFamily,
        data_dim: int,
        *,
        iterations: int = 5,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        use_x: bool = True,
        samples: int = 1,
        start: str = "prior",
    ):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        object.__setattr__(self, "model", model)  # read, never owned
        self.family, self.data_dim = family, data_dim
        self.iterations, self.use_x, self.samples = iterations, use_x, samples
        p = family.num_params
        self.update = mlp(2 * p + (data_dim if use_x else 0), hidden, 2 * p, activation)
        self.gradient_norm = nn.LayerNorm(p, elementwise_affine=False)
        self.start = start
        self.initial = None  # lambda_0 is the prior
        if start == "encoder":
            self.initial = MLPEncoder(data_dim, family, hidden=hidden, activation=activation)

    def step(self, lam: Tensor, x: Tensor) -> Tensor:
        """One gated update of lambda ``(batch, P)`` for flat data x ``(batch, data_dim)``."""
        _, grad = elbo_and_grad(self.model, self.family, lam, x, self.samples)  # detached
        inputs = [lam, self.gradient_norm(grad)]  # the gradient enters as data
        if self.use_x:
            inputs.append(x)
        proposal, gate_logit = self.update(torch.cat(inputs, dim=-1)).chunk(2, dim=-1)
        gate = torch.sigmoid(gate_logit)
        return gate * lam + (1 - gate) * proposal

    def trajectory(self, x: Tensor) -> list[Tensor]:
        """lambda_1, ..., lambda_T for data x, from lambda_0 (the prior or the encoder's)."""
        x = flat_data(x, self.data_dim, "IterativeEncoder")
        if self.initial is not None:
            lam = self.initial(x)
        else:
            lam = self.family.prior_init(x.shape[0], device=x.device, dtype=x.dtype)
        out = []
        for _ in range(self.iterations):
            lam = self.step(lam, x)
            out.append(lam)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.trajectory(x)[-1]
