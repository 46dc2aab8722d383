r"""Per-datapoint variational inference: optimise a free lambda_i for every datapoint.

Classical (non-amortized) VI fits q(z; lambda_i) to p(z | x_i) by gradient ascent on
that datapoint's ELBO (Hoffman et al. 2013; Cremer, Li & Duvenaud 2018 call the optimum
q*). Because the objective of a batch is a *sum* of per-datapoint ELBOs, the gradient
with respect to row i of ``lam`` depends on x_i alone, so one vectorised optimiser fits
thousands of independent problems at once. Each row carries its own Adam state, step
count and learning rate, and leaves the computation once it has converged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .estimators import elbo
from .families import VariationalFamily
from .model import LatentVariableModel

__all__ = ["fit_local", "LocalFit", "AdamState", "adam_step"]


@dataclass
class LocalFit:
    """Result of :func:`fit_local`.

    Attributes:
        lam: the fitted parameters lambda*, ``(batch, num_params)``.
        elbo: each row's mean ELBO estimate over its last window of steps, ``(batch,)``
            (a noisy running figure; evaluate ``amortized.elbo`` with many samples for a
            number to report).
        steps: gradient steps each row took, ``(batch,)``.
        converged: whether each row met the stopping rule before ``steps`` ran out.
        trace: per check, the step, the mean ELBO over all rows and the rows still active.
    """

    lam: Tensor
    elbo: Tensor
    steps: Tensor
    converged: Tensor
    trace: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class AdamState:
    """Adam moments for a ``(rows, params)`` tensor, with a step count per row."""

    m: Tensor
    v: Tensor
    t: Tensor  # (rows,)

    @classmethod
    def zeros_like(cls, lam: Tensor) -> AdamState:
        return cls(torch.zeros_like(lam), torch.zeros_like(lam), lam.new_zeros(lam.shape[0]))


def adam_step(
    lam: Tensor,
    grad: Tensor,
    state: AdamState,
    lr: Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, AdamState]:
    """One Adam ascent step per row (Kingma & Ba 2015): a pure ``step(state) -> state``.

    ``lr`` is ``(rows,)``: every row has its own step size.
    """
    lam, state = lam.clone(), AdamState(state.m.clone(), state.v.clone(), state.t.clone())
    adam_step_(lam, grad, state, lr, betas, eps)
    return lam, state


def adam_step_(
    lam: Tensor,
    grad: Tensor,
    state: AdamState,
    lr: Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    scratch: Tensor | None = None,
    scale: Tensor | None = None,
) -> None:
    """:func:`adam_step` in place: updates ``lam`` and ``state`` without new big tensors.

    For a flow whose lam holds network weights, lam has tens of thousands of entries
    per row, and the temporaries of the pure form dominate the time of a step.
    ``scratch``, shaped like ``lam``, is reused as the one temporary when given;
    ``scale`` ``(params,)`` multiplies the learning rate entry by entry.
    """
    b1, b2 = betas
    state.t += 1
    state.m.lerp_(grad, 1 - b1)
    state.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bias1 = 1 - b1 ** state.t[:, None]  # (rows, 1)
    bias2 = (1 - b2 ** state.t[:, None]).sqrt_()
    # lam += lr m_hat / (sqrt(v_hat) + eps), with the one temporary reused
    step = torch.sqrt(state.v, out=scratch).div_(bias2).add_(eps)
    torch.div(state.m, step, out=step)
    if scale is not None:
        step.mul_(scale)
    lam.addcmul_(step, lr[:, None] / bias1)


def fit_local(
    model: LatentVariableModel,
    family: VariationalFamily,
    x: Tensor,
    init: Tensor | None = None,
    *,
    steps: int = 2000,
    lr: float = 0.01,
    samples: int = 8,
    check_every: int = 50,
    tol: float = 0.01,
    lr_decay: float = 0.5,
    max_decays: int = 3,
    check_samples: int = 32,
    batch_size: int | None = None,
    analytic_kl: bool = True,
    progress: bool = False,
) -> LocalFit:
    r"""Fit lambda_i for every row of x by stochastic gradient ascent on its own ELBO.

    Each row runs Adam with its own learning rate. Every ``check_every`` steps a row
    reaches a plateau when two signs of progress both fail: its mean ELBO over the window
    did not beat its best window by ``tol`` nats, and its gain over the window,
    L(lambda_end) - L(lambda_start), estimated from ``check_samples`` draws shared by
    both ends (common random numbers: the Monte Carlo noise of the two ELBOs largely
    cancels), is no more than ``tol``. Either sign alone is fooled by noise now and then
    (a noisy window mean; a window in which the stochastic steps happened to lose
    ground). At a plateau the row's learning rate is multiplied by ``lr_decay``; after
    ``max_decays`` plateaus the row is converged and stops (it costs nothing from then
    on). No row runs more than ``steps`` steps. Model parameters get no gradients.

    Arguments:
        model: the generative model p(x, z), held fixed.
        family: the variational family q(z; lambda).
        x: data, ``(batch, *data_shape)``.
        init: starting parameters ``(batch, num_params)`` (e.g. an encoder's output);
            the prior's parameters by default.
        lr: Adam's learning rate, times the family's per-entry ``lr_scale()``.
        samples: reparameterized samples per gradient estimate.
        batch_size: rows optimised together (all of x by default); rows are independent,
            so this changes memory and speed, never the answer's distribution.

    Example:
        >>> import torch
        >>> from amortized import LatentVariableModel, DiagonalGaussian
        >>> from amortized.decoders import GaussianMLPDecoder
        >>> model = LatentVariableModel(GaussianMLPDecoder(2, 3, hidden=(4,), scale=1.0), 2)
        >>> fit = fit_local(model, DiagonalGaussian(2), torch.randn(5, 3), steps=100)
        >>> fit.lam.shape
        torch.Size([5, 4])
    """
    n = x.shape[0]
    if init is None:
        init = family.prior_init(n, device=x.device, dtype=x.dtype)
    if init.shape != (n, family.num_params):
        raise ValueError(
            f"init must have shape ({n}, {family.num_params}), got {tuple(init.shape)}"
        )
    if steps < 1 or check_every < 1 or samples < 1 or check_samples < 1:
        raise ValueError("steps, check_every, samples and check_samples must be >= 1")
    batch_size = batch_size or n
    parts = [
        _fit_block(
            model, family, x[i : i + batch_size], init[i : i + batch_size].detach(),
            steps=steps, lr=lr, samples=samples, check_every=check_every, tol=tol,
            lr_decay=lr_decay, max_decays=max_decays, check_samples=check_samples,
            analytic_kl=analytic_kl, progress=progress,
        )
        for i in range(0, n, batch_size)
    ]  # fmt: skip
    trace: dict[str, list[float]] = {"step": [], "elbo": [], "active": []}
    for part in parts:  # concatenate block traces (blocks run one after another)
        for key in trace:
            trace[key] += part.trace[key]
    return LocalFit(
        lam=torch.cat([p.lam for p in parts]),
        elbo=torch.cat([p.elbo for p in parts]),
        steps=torch.cat([p.steps for p in parts]),
        converged=torch.cat([p.converged for p in parts]),
        trace=trace,
    )


def _paired_gain(
    model, family, x, before: Tensor, after: Tensor, samples: int, analytic_kl: bool
) -> Tensor:
    """L(after) - L(before) per row, both estimated from the same draws, ``(batch,)``."""
    seed = int(torch.randint(2**62, ()))  # from the global generator: reproducible
    devices = [x.device] if x.device.type == "cuda" else []
    values = []
    with torch.no_grad():
        for lam in (before, after):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                values.append(elbo(model, family, lam, x, samples, analytic_kl=analytic_kl))
    return values[1] - values[0]


def _fit_block(
    model, family, x, lam, *, steps, lr, samples, check_every, tol, lr_decay, max_decays,
    check_samples, analytic_kl, progress,
) -> LocalFit:  # fmt: skip
    n = x.shape[0]
    lam = lam.clone()  # (n, P)
    adam = AdamState.zeros_like(lam)
    row_lr = lam.new_full((n,), lr)
    scale = family.lr_scale(lam.device, lam.dtype)
    best = lam.new_full((n,), -float("inf"))
    last = lam.new_full((n,), -float("inf"))
    decays = torch.zeros(n, dtype=torch.long, device=lam.device)
    taken = torch.zeros(n, dtype=torch.long, device=lam.device)
    active = torch.ones(n, dtype=torch.bool, device=lam.device)
    trace: dict[str, list[float]] = {"step": [], "elbo": [], "active": []}
    bar = tqdm(total=steps, disable=not progress, desc="fit_local", leave=False)
    done = 0
    while done < steps and bool(active.any()):
        idx = active.nonzero().squeeze(1)  # rows still being optimised
        lam_a, x_a, lr_a = lam[idx], x[idx], row_lr[idx]
        state = AdamState(adam.m[idx], adam.v[idx], adam.t[idx])
        window = min(check_every, steps - done)
        window_sum = lam.new_zeros(idx.numel())
        lam_start = lam_a.clone()  # lam_a is updated in place
        scratch = torch.empty_like(lam_a)
        for _ in range(window):
            lam_a.requires_grad_(True)
            with torch.enable_grad():
                value = elbo(model, family, lam_a, x_a, samples, analytic_kl=analytic_kl)
                (grad,) = torch.autograd.grad(value.sum(), lam_a)
            window_sum += value.detach()
            lam_a = lam_a.detach()
            adam_step_(lam_a, grad, state, lr_a, scratch=scratch, scale=scale)
        done += window
        bar.update(window)
        mean = window_sum / window  # (active,)
        # Plateau rule: no sign of a gain of more than tol nats -> smaller steps. With
        # tol = -inf no row can plateau, and the paired check (2 x check_samples draws per
        # window) is skipped.
        if tol == -math.inf:
            plateau = torch.zeros_like(active[idx])
        else:
            gain = _paired_gain(model, family, x_a, lam_start, lam_a, check_samples, analytic_kl)
            plateau = (gain <= tol) & (mean <= best[idx] + tol)
        best[idx] = torch.maximum(best[idx], mean)
        decays[idx] += plateau.long()
        row_lr[idx] = torch.where(plateau, lr_a * lr_decay, lr_a)
        lam[idx], last[idx] = lam_a, mean
        adam.m[idx], adam.v[idx], adam.t[idx] = state.m, state.v, state.t
        taken[idx] += window
        active[idx] = decays[idx] < max_decays
        trace["step"].append(done)
        trace["elbo"].append(float(last.mean()))
        trace["active"].append(int(active.sum()))
        bar.set_postfix(elbo=f"{trace['elbo'][-1]:.2f}", active=trace["active"][-1])
    bar.close()
    return LocalFit(lam=lam, elbo=last, steps=taken, converged=~active, trace=trace)
