r"""Annealed importance sampling (AIS) for log p(x), and bidirectional Monte Carlo (BDMC).

AIS (Neal 2001) moves samples from a normalized start q(z) to the posterior through the
geometric path f_b(z) = q(z)^{1-b} p(x, z)^b, 0 = b_0 < ... < b_T = 1, with an HMC
transition that leaves each f_b invariant, and accumulates the log weight
sum_t (b_t - b_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1})]. Its exponential is an
unbiased estimate of p(x), so the log of the average over chains is a stochastic lower
bound that tightens as the schedule lengthens. This is the estimator Wu et al. (2017)
and Cremer, Li & Duvenaud (2018) use to evaluate decoder-based models.

BDMC (Grosse, Ghahramani & Adams 2015): on data simulated from the model, the latent
that generated x is an exact posterior sample, so AIS run in reverse (b from 1 to 0)
from it gives a stochastic *upper* bound. The true log p(x) lies between the two, and
the width of the sandwich measures the estimator's error instead of assuming it.

Shapes: chains first, then batch: z is ``(chains, batch, latent_dim)``; results are
``(batch,)``. Every datapoint and chain runs in one batched computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..families import VariationalFamily
from ..model import LatentVariableModel
from ..weights import LogMeanWeight

__all__ = ["AISResult", "ais", "reverse_ais", "bdmc", "schedule"]


@dataclass
class AISResult:
    """Result of :func:`ais` or :func:`reverse_ais`.

    Attributes:
        log_px: the estimate of log p(x), ``(batch,)``: a stochastic lower bound for
            forward AIS, an upper bound for reverse AIS.
        stderr: delta-method standard error of ``log_px`` over chains, ``(batch,)``.
        khat: Pareto k-hat of the chains' weights, ``(batch,)`` (:mod:`amortized.weights`;
            NaN for fewer than 25 chains, too few to fit a tail to).
        remaining: what more chains would still add to ``log_px``, ``(batch,)``
            (:mod:`amortized.weights`): AIS's weights are unbiased for p(x) at any schedule,
            so a short schedule shows as weights of high variance and a large remainder.
        log_weights: ``(chains, batch)``.
        acceptance: mean HMC acceptance rate per datapoint, ``(batch,)``.
        step_size: the adapted leapfrog step size at the end, ``(batch,)``.
    """

    log_px: Tensor
    stderr: Tensor
    log_weights: Tensor
    acceptance: Tensor
    step_size: Tensor
    khat: Tensor
    remaining: Tensor


def schedule(steps: int, kind: str = "sigmoid", delta: float = 4.0) -> Tensor:
    """Inverse temperatures b_0 = 0 < ... < b_steps = 1, ``(steps + 1,)`` in float64.

    "sigmoid" spaces them as in Grosse et al. (2015) (dense near both ends), "linear"
    evenly.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "linear":
        return t
    if kind != "sigmoid":
        raise ValueError(f"schedule kind must be 'sigmoid' or 'linear', got {kind!r}")
    s = torch.sigmoid(delta * (2 * t - 1))
    return (s - s[0]) / (s[-1] - s[0])


class _Path:
    """log q, log p(x, .) and their gradients at z, so any f_b is a cheap combination."""

    def __init__(self, model: LatentVariableModel, x: Tensor, start):
        self.model, self.x, self.start = model, x, start

    def evaluate(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            log_q = self.start.log_prob(z)  # (chains, batch)
            log_p = self.model.log_joint(self.x, z)  # (chains, batch)
            (grad_q,) = torch.autograd.grad(log_q.sum(), z, retain_graph=True)
            (grad_p,) = torch.autograd.grad(log_p.sum(), z)
        return log_q.detach(), log_p.detach(), grad_q, grad_p


def _anneal(
    model: LatentVariableModel,
    x: Tensor,
    start,
    z: Tensor,
    betas: Tensor,
    *,
    leapfrog: int,
    step_size: float,
    target_accept: float,
    adapt: float,
) -> AISResult:
    """Run the annealing chain along ``betas`` (increasing or decreasing) from z."""
    chains, batch, _ = z.shape
    path = _Path(model, x, start)
    log_q, log_p, grad_q, grad_p = path.evaluate(z)
    log_w = z.new_zeros(chains, batch)
    eps = z.new_full((batch,), step_size)  # per-datapoint step size
    accepted = z.new_zeros(batch)
    betas = betas.tolist()
    for prev, beta in zip(betas[:-1], betas[1:], strict=True):
        log_w = log_w + (beta - prev) * (log_p - log_q)
        # HMC transition leaving f_beta invariant: one leapfrog trajectory per chain.
        e = eps[None, :, None]  # (1, batch, 1)
        momentum = torch.randn_like(z)
        energy0 = -((1 - beta) * log_q + beta * log_p) + 0.5 * momentum.square().sum(-1)
        z_new = z
        p = momentum + 0.5 * e * ((1 - beta) * grad_q + beta * grad_p)
        for step in range(leapfrog):
            z_new = z_new + e * p
            new = path.evaluate(z_new)
            grad = (1 - beta) * new[2] + beta * new[3]
            p = p + (e if step < leapfrog - 1 else 0.5 * e) * grad
        energy1 = -((1 - beta) * new[0] + beta * new[1]) + 0.5 * p.square().sum(-1)
        log_accept = (energy0 - energy1).nan_to_num(nan=-math.inf)  # (chains, batch)
        accept = torch.rand_like(log_accept).log() < log_accept
        z = torch.where(accept[..., None], z_new, z)
        log_q, log_p, grad_q, grad_p = (
            torch.where(accept, new[0], log_q),
            torch.where(accept, new[1], log_p),
            torch.where(accept[..., None], new[2], grad_q),
            torch.where(accept[..., None], new[3], grad_p),
        )
        rate = accept.float().mean(0)  # (batch,)
        accepted = accepted + rate
        # Step sizes chase the target acceptance (as in Wu et al. 2017's evaluation code).
        eps = torch.where(rate > target_accept, eps * adapt, eps / adapt)
    weights = LogMeanWeight(chains)
    weights.add(log_w)
    est = weights.result()
    return AISResult(est.log_px, est.stderr, log_w, accepted / (len(betas) - 1), eps, est.khat,
                     est.remaining)  # fmt: skip


def _start(model, family, lam, batch):
    """The normalized start of the path: q(z; lam), or the prior when both are None."""
    if (family is None) != (lam is None):
        raise ValueError("give both family and lam, or neither (start at the prior)")
    if family is None:
        return model.prior.expand((batch,)) if model.prior.batch_shape == () else model.prior
    return family.distribution(lam)


def ais(
    model: LatentVariableModel,
    x: Tensor,
    family: VariationalFamily | None = None,
    lam: Tensor | None = None,
    *,
    steps: int = 1000,
    chains: int = 16,
    leapfrog: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    adapt: float = 1.02,
    kind: str = "sigmoid",
) -> AISResult:
    r"""AIS estimate of log p(x) from q(z; lam) (or the prior) to the posterior.

    Arguments:
        model: the model p(x, z).
        x: data ``(batch, *data_shape)``.
        family, lam: the start distribution q(z; lam) (e.g. an encoder's output); the
            prior when both are None. A start close to the posterior needs fewer steps.
        steps: intermediate distributions; chains: independent chains per datapoint.
        leapfrog, step_size: HMC trajectory length and initial step size, adapted per
            datapoint toward ``target_accept`` by factors of ``adapt``.
        kind: the schedule of inverse temperatures (see :func:`schedule`).

    Example:
        >>> import torch
        >>> from amortized import LatentVariableModel
        >>> from amortized.nets.decoders import GaussianMLPDecoder
        >>> model = LatentVariableModel(GaussianMLPDecoder(2, 3, hidden=(4,), scale=1.0), 2)
        >>> ais(model, torch.randn(5, 3), steps=10, chains=4).log_px.shape
        torch.Size([5])
    """
    if chains < 1 or leapfrog < 1:
        raise ValueError("chains and leapfrog must be >= 1")
    batch = x.shape[0]
    start = _start(model, family, lam, batch)
    with torch.no_grad():
        z = start.sample((chains,))  # (chains, batch, D)
    return _anneal(
        model, x, start, z, schedule(steps, kind).to(z.dtype),
        leapfrog=leapfrog, step_size=step_size, target_accept=target_accept, adapt=adapt,
    )  # fmt: skip


def reverse_ais(
    model: LatentVariableModel,
    x: Tensor,
    z: Tensor,
    family: VariationalFamily | None = None,
    lam: Tensor | None = None,
    *,
    steps: int = 1000,
    leapfrog: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    adapt: float = 1.02,
    kind: str = "sigmoid",
) -> AISResult:
    r"""Reverse AIS from exact posterior samples z ``(chains, batch, D)``: an upper bound.

    Valid only where z are exact draws from p(z | x), as for data simulated from the model
    (x ~ p(x | z) with z ~ p(z)); see :func:`bdmc`.
    """
    if z.dim() != 3 or z.shape[1] != x.shape[0]:
        raise ValueError(f"z must be (chains, {x.shape[0]}, latent_dim), got {tuple(z.shape)}")
    start = _start(model, family, lam, x.shape[0])
    result = _anneal(
        model, x, start, z.detach(), schedule(steps, kind).flip(0).to(z.dtype),
        leapfrog=leapfrog, step_size=step_size, target_accept=target_accept, adapt=adapt,
    )  # fmt: skip
    # E[exp(log_w)] = 1 / p(x): the estimate of log p(x) is minus the log mean weight,
    # and more chains would lower it (tighten the upper bound) by what they would add.
    result.log_px, result.remaining = -result.log_px, -result.remaining
    return result


@torch.no_grad()
def bdmc(
    model: LatentVariableModel,
    n: int,
    *,
    steps: int = 1000,
    chains: int = 16,
    **kwargs,
) -> tuple[Tensor, AISResult, AISResult]:
    """Bidirectional Monte Carlo on n datapoints simulated from the model.

    Returns the simulated x, the forward AIS result (a lower bound on log p(x)) and the
    reverse AIS result (an upper bound); ``upper.log_px - lower.log_px`` bounds the
    error of either estimate.
    """
    z = model.prior.sample((n,))  # (n, D)
    x = model.likelihood(z).sample()  # (n, *data_shape)
    lower = ais(model, x, steps=steps, chains=chains, **kwargs)
    upper = reverse_ais(model, x, z.expand(chains, *z.shape), steps=steps, **kwargs)
    return x, lower, upper
