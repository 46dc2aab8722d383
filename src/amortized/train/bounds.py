"""The bounds a route trains on, and the evaluation it is judged by.

:func:`training_bounds` asks the config's route (:mod:`amortized.inference.routes`) for
the per-row bounds that train the model and the encoder, built on the config's objective
(:func:`_objective`: ELBO with the KL weight and free bits, or IWAE-k);
:func:`evaluate_elbo` scores the q a route computes, and :func:`validation_elbo` scores
it after an epoch, on a random stream of its own (:func:`own_stream`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .. import distributed
from ..config import TrainConfig
from ..estimators import elbo, iwae_bound, kl_to_prior
from ..families import VariationalFamily
from ..inference.routes import Amortized, Route, route_for
from ..measure.diagnostics import kl_per_dimension
from ..model import LatentVariableModel

__all__ = ["free_bits_kl", "training_bounds", "evaluate_elbo", "validation_elbo", "own_stream"]


def free_bits_kl(
    model: LatentVariableModel, family: VariationalFamily, lam: Tensor, nats: float, mode: str
) -> Tensor:
    """Each row's KL with free bits (Kingma et al. 2016), ``(batch,)``.

    The penalty is sum_j max(nats, mean over the minibatch of KL_j) over the latent
    dimensions j (``mode="dimension"``), or max(nats, mean KL) (``"total"``): a group whose
    minibatch-mean KL is below the floor costs the constant floor and gets no gradient.
    Returned per row so that the mean over the minibatch is that penalty.
    """
    if mode == "dimension":
        kl = kl_per_dimension(family, lam, model.prior)  # (batch, D)
    else:
        kl = kl_to_prior(family.distribution(lam), model.prior).unsqueeze(-1)  # (batch, 1)
    free = kl.detach().mean(0) < nats  # (groups,)
    return torch.where(free, torch.full_like(kl, nats), kl).sum(-1)


def _objective(config: TrainConfig, model, family, lam, x, beta) -> Tensor:
    """The per-row training bound at lam: ELBO (with free bits if set) or IWAE."""
    if config.objective == "iwae":
        return iwae_bound(model, family, lam, x, config.samples, beta=beta)
    if config.free_bits == 0:
        return elbo(model, family, lam, x, config.samples, beta=beta)
    reconstruction = elbo(model, family, lam, x, config.samples, beta=0.0)
    return reconstruction - beta * free_bits_kl(
        model, family, lam, config.free_bits, config.free_bits_mode
    )


def training_bounds(
    config: TrainConfig,
    model: LatentVariableModel,
    encoder: nn.Module,
    family: VariationalFamily,
    x: Tensor,
    beta: float = 1.0,
    route: Route | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The bounds, ``(batch,)`` each, whose gradients train the model and the encoder, as
    the config's route (:mod:`amortized.inference.routes`) makes them from the config's objective.

    The same tensor is returned twice where model and encoder share the objective.
    ``route``, if given, is the config's route already made (the loop makes it once).
    """

    def bound(lam: Tensor) -> Tensor:
        return _objective(config, model, family, lam, x, beta)

    return (route or route_for(config)).bounds(model, encoder, family, x, bound, beta)


def evaluate_elbo(
    model,
    encoder,
    family,
    x: Tensor,
    samples: int = 10,
    batch_size: int = 1000,
    config: TrainConfig | None = None,
) -> float:
    """Mean ELBO over x of the encoder's q, or of the q a config's route computes."""
    route = Amortized() if config is None else route_for(config)
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        lam = route.lam(model, encoder, family, xb)
        with torch.no_grad():
            total += float(elbo(model, family, lam, xb, samples).sum())
    return total / x.shape[0]




class _Bounds(nn.Module):
    """:func:`training_bounds` as a module over the model and the encoder, so that
    DistributedDataParallel can wrap it and average their gradients."""

    def __init__(self, config: TrainConfig, model, encoder, family, route: Route):
        super().__init__()
        self.config, self.model, self.encoder, self.family = config, model, encoder, family
        self.route = route

    def forward(self, x: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
        return training_bounds(self.config, self.model, self.encoder, self.family, x, beta,
                               route=self.route)  # fmt: skip


#: Offsets of the seeds of what is measured on the side of training, from ``config.seed``.
VALIDATION_STREAM, DIAGNOSTICS_STREAM = 7919, 7927


@contextlib.contextmanager
def own_stream(seed: int, device: torch.device):
    """Draws from a stream of their own, the same at every call: what is measured after an
    epoch leaves training's random numbers as they were (so how much is measured cannot
    change what is trained), and every epoch is scored under the same draws (so two
    epochs' scores differ by the model, not by the draws: common random numbers)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def validation_elbo(model, encoder, family, x: Tensor, config: TrainConfig, world) -> float:
    """Mean validation ELBO on the validation stream; with several processes each scores
    its share and they add up."""
    with own_stream(config.seed + VALIDATION_STREAM + world.rank, x.device):
        if world.size == 1:
            return evaluate_elbo(model, encoder, family, x, config.valid_samples, config=config)
        share = x[world.rank :: world.size]
        local = evaluate_elbo(model, encoder, family, share, config.valid_samples, config=config)
    return distributed.all_sum(local * share.shape[0], world) / x.shape[0]
