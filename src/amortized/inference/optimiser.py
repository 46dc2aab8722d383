r"""The one optimiser of lambda: per-datapoint, scale-free Adam steps on each row's ELBO.

Classical VI (:func:`amortized.fit_local`), test-time refinement (:func:`amortized.refine`)
and the iterative encoder's gradient input all move a parameter row lambda_i uphill on
datapoint i's ELBO. They share what is here: the gradient probe :func:`elbo_and_grad`, one
Adam step per row (pure for differentiable refinement, in place for speed), and
:class:`LambdaOptimiser`, the windowed loop with its stopping rule and certificate.

What makes one optimiser serve posteriors of every scale, measured on the closed-form
battery of ``tests/battery.py`` (``benchmarks/battery.py``):

* **Steps in the scale of the current q.** The family's :meth:`step_scale` gives each
  entry's natural length (a mean moves in units of q's standard deviation, a log scale
  in nats), so Adam optimises whitened coordinates: a posterior with standard deviation
  1e-3 is as easy as one with 1. Plain Adam moves a mean by about lr per step whatever
  q's width, so on a peaked posterior it either jitters far outside it or crawls.
* **Adam's memory is restarted when the gradient scale falls.** From the prior start the
  first gradients are orders of magnitude larger than those near q*; Adam's second
  moment (beta_2 = 0.999) would remember them for thousands of steps and shrink every
  later step. A row whose mean squared gradient over a window is below
  ``restart_ratio`` times Adam's estimate starts its moments afresh.
* **Best iterate under common draws.** Every ``check_every`` steps each row's ELBO is
  estimated from one fixed set of ``check_samples`` draws (common random numbers: the
  same noise for every check, so two iterates are compared without Monte Carlo noise in
  their difference). A row that did not improve by ``tol`` reaches a plateau: its step
  size is multiplied by ``lr_decay`` and its moments restart. The result is each row's
  best iterate, never a worse last one, so a family started at another family's q*
  cannot end below its start. The iterate itself is not sent back to the best one: a
  flow started at a Gaussian's q* first loses ground (its converged base Gaussian
  jitters at the full step size, and its fresh weights' first steps are long) and gains
  more than it lost only hundreds of steps later, which a return to the best iterate at
  every check never allows (RESULTS.md, issue 17: 0.01 nats gained instead of 1.2 on
  MNIST images).
* **A certificate per row.** After ``max_decays`` plateaus a row has converged and
  leaves the computation. Each row also carries ``remaining``, an estimate of what more
  steps would still gain: the last window's gain extrapolated geometrically with the
  ratio of the last two windows' gains.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..estimators import elbo
from ..families import VariationalFamily
from ..model import LatentVariableModel

__all__ = [
    "elbo_and_grad",
    "AdamState",
    "adam_step",
    "adam_step_",
    "LambdaOptimiser",
    "LocalFit",
]

BETAS = (0.9, 0.999)
EPS = 1e-8


def elbo_and_grad(
    model: LatentVariableModel,
    family: VariationalFamily,
    lam: Tensor,
    x: Tensor,
    samples: int = 1,
    *,
    beta: float = 1.0,
    analytic_kl: bool = True,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Each row's ELBO estimate ``(batch,)`` and its gradient in lam ``(batch, P)``.

    Rows are independent, so the gradient of the summed ELBO is every row's own gradient.
    With ``create_graph=False`` both are detached and lam is not modified; with
    ``create_graph=True`` (differentiating through refinement) the gradient keeps its
    graph, and lam must then require grad itself or be a function of something that does.
    """
    if not create_graph or not lam.requires_grad:
        lam = lam.detach().requires_grad_(True)
    with torch.enable_grad():
        value = elbo(model, family, lam, x, samples, beta=beta, analytic_kl=analytic_kl)
        (grad,) = torch.autograd.grad(value.sum(), lam, create_graph=create_graph)
    return (value if create_graph else value.detach()), grad


@dataclass
class AdamState:
    """Adam moments for a ``(rows, params)`` tensor, with a step count per row."""

    m: Tensor
    v: Tensor
    t: Tensor  # (rows,)

    @classmethod
    def zeros_like(cls, lam: Tensor) -> AdamState:
        return cls(torch.zeros_like(lam), torch.zeros_like(lam), lam.new_zeros(lam.shape[0]))

    def scale_fell(self, mean_grad_sq: Tensor, ratio: float) -> Tensor:
        """Rows whose mean squared (whitened) gradient over the last steps, ``(rows,)``,
        fell below ``ratio`` times Adam's second-moment estimate: its memory of larger
        gradients would shrink every later step. ``(rows,)`` bool, never differentiated."""
        v_hat = self.v.detach() / (1 - BETAS[1] ** self.t.detach()[:, None]).clamp_min(1e-300)
        return mean_grad_sq.detach() < ratio * v_hat.sum(-1)

    def restarted(self, rows: Tensor) -> AdamState:
        """The state with the moments of the rows where ``rows`` ``(rows,)`` is True
        forgotten (a pure step: differentiable through the rows kept)."""
        keep = (~rows).to(self.m.dtype)
        return AdamState(self.m * keep[:, None], self.v * keep[:, None], self.t * keep)


def adam_step(
    lam: Tensor,
    grad: Tensor,
    state: AdamState,
    lr: Tensor,
    scale: Tensor | None = None,
    betas: tuple[float, float] = BETAS,
    eps: float = EPS,
) -> tuple[Tensor, AdamState]:
    """One Adam ascent step per row (Kingma & Ba 2015): a pure ``step(state) -> state``.

    ``lr`` is ``(rows,)``: every row has its own step size. ``scale`` (``(rows, P)`` or
    ``(P,)``) is each entry's natural length: Adam runs on the whitened gradient
    ``grad * scale`` and the step is multiplied back by ``scale``. Written without
    in-place updates, so the result can be differentiated with respect to lam and grad.
    The denominator is sqrt(v_hat + eps^2) + eps: the same step where v >> eps^2, and a
    finite derivative where a gradient entry is exactly 0 (sqrt'(0) is infinite).
    """
    b1, b2 = betas
    if scale is not None:
        grad = grad * scale
    t = state.t + 1
    m = b1 * state.m + (1 - b1) * grad
    v = b2 * state.v + (1 - b2) * grad * grad
    m_hat = m / (1 - b1 ** t[:, None])
    v_hat = v / (1 - b2 ** t[:, None])
    step = m_hat / ((v_hat + eps**2).sqrt() + eps)
    if scale is not None:
        step = step * scale
    return lam + lr[:, None] * step, AdamState(m, v, t)


def adam_step_(
    lam: Tensor,
    grad: Tensor,
    state: AdamState,
    lr: Tensor,
    scale: Tensor | None = None,
    betas: tuple[float, float] = BETAS,
    eps: float = EPS,
    scratch: Tensor | None = None,
) -> None:
    """:func:`adam_step` in place: updates ``lam``, ``grad`` and ``state`` without new big
    tensors (``grad`` is overwritten). For a flow whose lam holds network weights, lam has
    tens of thousands of entries per row and the temporaries of the pure form dominate the
    time of a step; ``scratch``, shaped like lam, is reused as the one temporary."""
    b1, b2 = betas
    if scale is not None:
        grad.mul_(scale)
    state.t += 1
    state.m.lerp_(grad, 1 - b1)
    state.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bias1 = 1 - b1 ** state.t[:, None]  # (rows, 1)
    bias2 = 1 - b2 ** state.t[:, None]
    # lam += lr m_hat / (sqrt(v_hat + eps^2) + eps), with the one temporary reused
    step = torch.div(state.v, bias2, out=scratch).add_(eps**2).sqrt_().add_(eps)
    torch.div(state.m, step, out=step)
    if scale is not None:
        step.mul_(scale)
    lam.addcmul_(step, lr[:, None] / bias1)


@dataclass
class LocalFit:
    """Result of :func:`amortized.fit_local` (and of :meth:`LambdaOptimiser.result`).

    Attributes:
        lam: each row's best iterate lambda*, ``(batch, num_params)``.
        elbo: each row's ELBO at lambda* estimated from the fit's fixed check draws,
            ``(batch,)`` (evaluate ``amortized.elbo`` with fresh draws for a number to
            report: the best of many iterates under one set of draws is biased upward).
        steps: gradient steps each row took, ``(batch,)``.
        converged: whether each row met the stopping rule before ``steps`` ran out.
        remaining: an estimate of what more steps would still gain, in nats ``(batch,)``
            (0 for converged rows whose last windows gained nothing).
        trace: per check, the step, the mean ELBO over all rows and the rows still active.
    """

    lam: Tensor
    elbo: Tensor
    steps: Tensor
    converged: Tensor
    remaining: Tensor
    trace: dict[str, list[float]] = field(default_factory=dict)


def common_draws_elbo(
    model, family, lam: Tensor, x: Tensor, samples: int, seed: int, analytic_kl: bool
) -> Tensor:
    """The ELBO of every row from the draws of ``seed`` ``(batch,)``: the same noise on
    every call, so the difference of two calls has no Monte Carlo noise from the draws
    themselves. The caller's random state is left as it was."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return elbo(model, family, lam, x, samples, analytic_kl=analytic_kl)


class LambdaOptimiser:
    r"""Rows of lambda moved uphill on their own ELBOs: see the module docstring.

    Every setting is required here; :func:`amortized.fit_local` holds their defaults.

    Arguments:
        model, family: p(x, z), held fixed (its parameters get no gradients), and q(z; lam).
        x: data ``(batch, *data_shape)``; lam: the start ``(batch, num_params)`` (not
            modified).
        lr: Adam's step size, in units of each entry's :meth:`step_scale`.
        samples: reparameterized draws per gradient.
        check_every: steps between checks; check_samples: the fixed draws of a check.
        tol: a window that gains no more than this (nats) is a plateau; with ``-inf``
            no row can plateau and the checks draw nothing.
        lr_decay, max_decays: a plateau multiplies the row's step size by ``lr_decay``;
            after ``max_decays`` plateaus the row has converged.
        restart_ratio: restart a row's moments when its mean squared whitened gradient
            over a window falls below this fraction of Adam's second-moment estimate.
    """

    def __init__(
        self,
        model: LatentVariableModel,
        family: VariationalFamily,
        x: Tensor,
        lam: Tensor,
        *,
        lr: float,
        samples: int,
        check_every: int,
        tol: float,
        lr_decay: float,
        max_decays: int,
        check_samples: int,
        restart_ratio: float,
        analytic_kl: bool,
    ):
        n = x.shape[0]
        self.model, self.family, self.x = model, family, x
        self.samples, self.check_every, self.tol = samples, check_every, tol
        self.lr_decay, self.max_decays, self.check_samples = lr_decay, max_decays, check_samples
        self.restart_ratio, self.analytic_kl = restart_ratio, analytic_kl
        self.lam = lam.detach().clone()  # (n, P): the current iterate
        self.adam = AdamState.zeros_like(self.lam)
        self.lr = self.lam.new_full((n,), lr)
        self.decays = torch.zeros(n, dtype=torch.long, device=lam.device)
        self.taken = torch.zeros(n, dtype=torch.long, device=lam.device)
        self.active = torch.ones(n, dtype=torch.bool, device=lam.device)
        self.gains = self.lam.new_full((2, n), math.inf)  # the last two windows' gains
        self.checking = tol != -math.inf
        self.seed = int(torch.randint(2**62, ())) if self.checking else 0  # reproducible
        self.best_lam = self.lam.clone()
        self.best = (
            self._check_value(self.lam, torch.arange(n, device=lam.device))
            if self.checking
            else self.lam.new_full((n,), -math.inf)
        )
        self.trace: dict[str, list[float]] = {"step": [], "elbo": [], "active": []}

    def _check_value(self, lam: Tensor, idx: Tensor) -> Tensor:
        """The rows ``idx``'s ELBO under the fit's fixed draws ``(len(idx),)``."""
        return common_draws_elbo(self.model, self.family, lam, self.x[idx],
                                 self.check_samples, self.seed, self.analytic_kl)  # fmt: skip

    def window(self, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Take ``steps`` steps on the active rows, then check them.

        Yields ``(idx, lam_a)`` after every step: the active rows and their current
        iterates (a view that the next step overwrites).
        """
        idx = self.active.nonzero().squeeze(1)  # rows still being optimised
        lam_a, x_a, lr_a = self.lam[idx], self.x[idx], self.lr[idx]
        state = AdamState(self.adam.m[idx], self.adam.v[idx], self.adam.t[idx])
        grad_sq = lam_a.new_zeros(idx.numel())  # sum over the window of |whitened grad|^2
        values = lam_a.new_zeros(idx.numel())  # sum over the window of the running ELBOs
        scratch = torch.empty_like(lam_a)
        for _ in range(steps):
            value, grad = elbo_and_grad(self.model, self.family, lam_a, x_a, self.samples,
                                        analytic_kl=self.analytic_kl)  # fmt: skip
            scale = self.family.step_scale(lam_a)
            adam_step_(lam_a, grad, state, lr_a, scale, scratch=scratch)
            grad_sq += grad.square().sum(-1)  # whitened by adam_step_
            values += value
            yield idx, lam_a
        restart = state.scale_fell(grad_sq / steps, self.restart_ratio)
        if self.checking:
            value = self._check_value(lam_a, idx)
            best = self.best[idx]
            gain = value - best
            improved = gain > 0
            plateau = gain <= self.tol
            self.best[idx] = torch.where(improved, value, best)
            self.best_lam[idx] = torch.where(improved[:, None], lam_a, self.best_lam[idx])
            self.gains[:, idx] = torch.stack([self.gains[1, idx], gain.clamp_min(0)])
            restart |= plateau
        else:
            plateau = torch.zeros_like(restart)
            self.best[idx] = values / steps  # no check draws: the window's running mean
        state = state.restarted(restart)
        self.decays[idx] += plateau.long()
        self.lr[idx] = torch.where(plateau, lr_a * self.lr_decay, lr_a)
        self.lam[idx] = lam_a
        self.adam.m[idx], self.adam.v[idx], self.adam.t[idx] = state.m, state.v, state.t
        self.taken[idx] += steps
        self.active[idx] = self.decays[idx] < self.max_decays

    def run(self, steps: int, progress: bool = False) -> LocalFit:
        """Windows of ``check_every`` steps until every row converged or took ``steps``."""
        done = 0
        bar = tqdm(total=steps, disable=not progress, desc="fit_local", leave=False)
        while done < steps and bool(self.active.any()):
            window = min(self.check_every, steps - done)
            for _ in self.window(window):
                pass
            done += window
            bar.update(window)
            self._record(done)
            bar.set_postfix(elbo=f"{self.trace['elbo'][-1]:.2f}", active=self.trace["active"][-1])
        bar.close()
        return self.result()

    def _record(self, done: int) -> None:
        self.trace["step"].append(done)
        self.trace["elbo"].append(float(self.best.mean()))
        self.trace["active"].append(int(self.active.sum()))

    def remaining(self) -> Tensor:
        """What more steps would still gain per row, ``(batch,)``: the last window's gain
        times r / (1 - r), with r the ratio of the last two windows' gains, at most 0.9
        (0.9 after a single window: nine more windows like it). Infinite for a row
        never checked."""
        last, before = self.gains[1], self.gains[0]
        ratio = torch.where(torch.isfinite(before), last / before.clamp_min(1e-300), 0.9)
        ratio = ratio.nan_to_num(0.0).clamp(0, 0.9)  # 0 / 0: two windows without a gain
        return torch.where(torch.isfinite(last), last * ratio / (1 - ratio), last)

    def result(self) -> LocalFit:
        lam = self.best_lam if self.checking else self.lam
        return LocalFit(
            lam=lam.clone(), elbo=self.best.clone(), steps=self.taken.clone(),
            converged=~self.active, remaining=self.remaining(), trace=self.trace,
        )  # fmt: skip
