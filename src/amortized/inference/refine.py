r"""Test-time refinement: K gradient steps on lambda, starting from an encoder's output.

Amortized inference computes lambda(x) in one pass; :func:`amortized.fit_local` optimises
lambda_i to convergence. Refinement sits between them: K steps of stochastic gradient
ascent on each row's ELBO from lambda_0 = encoder(x), so L[q] moves from the encoder's
bound (K = 0) toward L[q*] as K grows, at K gradient evaluations per datapoint. These are
the SVI steps of semi-amortized VAEs (Kim, Wiseman, Miller, Sontag & Rush 2018): SGD with
momentum and a clipped gradient norm, written without in-place updates so that, with
``create_graph=True``, the result can be differentiated with respect to lambda_0 (and the
model) through all K steps.

Rows are independent: the gradient norm is clipped row by row (the released SA-VAE code
clips the norm of the whole minibatch's gradient), so a datapoint's refinement does not
depend on what else is in its batch.
"""

from __future__ import annotations

import inspect
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import RefineMethod
from ..estimators import elbo
from ..families import VariationalFamily
from ..model import LatentVariableModel
from .optimiser import BETAS, AdamState, adam_step, elbo_and_grad

__all__ = ["refine", "refinement_path", "refinement_curve", "RefinementPoint"]

BETA2 = BETAS[1]
#: Adam's step size is lr for the first DECAY_STEPS steps, then falls as 1 / sqrt(k), so
#: the refinement curve keeps climbing toward L[q*] instead of stalling on the noise floor
#: of a fixed step; every DECAY_STEPS steps the moments restart where the gradients' scale
#: has fallen (see amortized.inference.optimiser).
DECAY_STEPS = 200
RESTART_RATIO = 0.1


def refine(
    model: LatentVariableModel,
    family: VariationalFamily,
    x: Tensor,
    lam: Tensor,
    *,
    steps: int,
    method: str = "adam",
    lr: float = 0.02,
    momentum: float | None = None,
    max_grad_norm: float | None = None,
    samples: int = 1,
    beta: float = 1.0,
    analytic_kl: bool = True,
    create_graph: bool = False,
) -> Tensor:
    r"""``steps`` momentum-SGD ascent steps on each row's ELBO from ``lam``; returns lambda_K.

    Step k: g = grad_lambda ELBO(lambda_k) from ``samples`` reparameterized draws, clipped
    to norm ``max_grad_norm`` per row; then with ``method="adam"`` (the default) an Adam
    step of size ``lr`` with beta_1 = ``momentum`` (0.9 by default); with
    ``method="sgd"``, v = momentum v + g (momentum 0.5 by default) and
    lambda_{k+1} = lambda_k + lr v, the update of Kim et al. (2018), who use lr 1 and
    clip 5 on a loss averaged over the minibatch. Plain SGD needs a step size below
    2 / (the ELBO's curvature), which is small where q is narrow (on binarized MNIST,
    lr 0.1 already makes the bound worse); Adam's steps are scale-free, so one lr suits
    every datapoint.

    With ``create_graph=False`` (test time) the result is detached and no graph is kept.
    With ``create_graph=True`` each step's gradient keeps its graph, so lambda_K is a
    differentiable function of ``lam`` and of the model's parameters (end-to-end
    semi-amortized training; memory grows with ``steps``).

    Example:
        >>> import torch
        >>> from amortized import LatentVariableModel, DiagonalGaussian
        >>> from amortized.nets.decoders import GaussianMLPDecoder
        >>> model = LatentVariableModel(GaussianMLPDecoder(2, 3, hidden=(4,), scale=1.0), 2)
        >>> family = DiagonalGaussian(2)
        >>> lam0 = family.prior_init(5)
        >>> refine(model, family, torch.randn(5, 3), lam0, steps=3, lr=0.1).shape
        torch.Size([5, 4])
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    _check(family, x, lam, method)
    momentum = _default_momentum(method, momentum)
    max_grad_norm = _default_clip(method, max_grad_norm)
    out = lam if create_graph else lam.detach()
    for lam_k in _steps(model, family, x, lam, steps, method, lr, momentum, max_grad_norm,
                        samples, beta, analytic_kl, create_graph):  # fmt: skip
        out = lam_k
    return out


METHODS = typing.get_args(RefineMethod)  # ("adam", "sgd"), declared in config.py


def _default_momentum(method: str, momentum: float | None) -> float:
    return momentum if momentum is not None else {"adam": 0.9, "sgd": 0.5}[method]


def _default_clip(method: str, max_grad_norm: float | None) -> float | None:
    """SGD's steps are the gradient's size: clipped to norm 5 per row by default. Adam's are
    normalised already, and a clipped noisy gradient would bias where it settles (the norm
    mixes a mean's entries with a log scale's), so it clips nothing unless asked."""
    if max_grad_norm is not None:
        return max_grad_norm
    return 5.0 if method == "sgd" else None


def _check(family: VariationalFamily, x: Tensor, lam: Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if lam.shape != (x.shape[0], family.num_params):
        raise ValueError(
            f"lam must have shape ({x.shape[0]}, {family.num_params}), got {tuple(lam.shape)}"
        )


def _steps(
    model, family, x, lam, steps, method, lr, momentum, max_grad_norm, samples, beta,
    analytic_kl, create_graph,
):  # fmt: skip
    """Yield lambda_1, ..., lambda_steps (see :func:`refine`)."""
    if not create_graph or not lam.requires_grad:
        lam = lam.detach().requires_grad_(create_graph)  # a leaf when nothing came before
    velocity = torch.zeros_like(lam)  # SGD's velocity
    adam = AdamState.zeros_like(lam.detach())
    grad_sq = lam.new_zeros(lam.shape[0]).detach()  # |whitened gradient|^2 since the check
    for k in range(1, steps + 1):
        if not create_graph:
            lam = lam.detach().requires_grad_(True)
        _, grad = elbo_and_grad(model, family, lam, x, samples, beta=beta,
                                analytic_kl=analytic_kl, create_graph=create_graph)  # fmt: skip
        if max_grad_norm is not None:
            norm = grad.norm(dim=-1, keepdim=True)  # (batch, 1)
            grad = grad * (max_grad_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
        if method == "sgd":
            velocity = momentum * velocity + grad
            lam = lam + lr * velocity
        else:  # the shared optimiser's step, its size decaying as 1 / sqrt(k / DECAY_STEPS)
            scale = family.step_scale(lam if create_graph else lam.detach())
            rate = lam.new_full((lam.shape[0],), lr * min(1.0, (DECAY_STEPS / k) ** 0.5))
            lam, adam = adam_step(lam, grad, adam, rate.detach(), scale, betas=(momentum, BETA2))
            whitened = grad.detach() if scale is None else grad.detach() * scale
            grad_sq = grad_sq + whitened.square().sum(-1)
            if k % DECAY_STEPS == 0:  # restart moments where the gradient scale fell
                adam = adam.restarted(adam.scale_fell(grad_sq / DECAY_STEPS, RESTART_RATIO))
                grad_sq = torch.zeros_like(grad_sq)
        yield lam if create_graph else lam.detach()


#: refine's step settings and their defaults (one source: refine's signature)
_STEP_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(refine).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("steps", "create_graph")
}


@dataclass
class RefinementPoint:
    """L[q] after ``steps`` refinement steps, and what it cost per datapoint."""

    steps: int
    elbo: float
    stderr: float
    seconds_per_datapoint: float


def refinement_path(
    model: LatentVariableModel,
    family: VariationalFamily,
    x: Tensor,
    lam: Tensor,
    steps: Sequence[int],
    **refine_kwargs,
) -> Iterator[tuple[int, Tensor, float]]:
    """Yield ``(K, lambda_K, seconds)`` for each K in ``steps``, refining once to max(K).

    ``seconds`` is the wall-clock time of the K refinement steps (what a user refining K
    steps pays), not counting whatever the caller does between yields.
    """
    wanted = sorted(set(steps))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"steps must be non-negative integers, got {steps}")
    unknown = set(refine_kwargs) - set(_STEP_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown refinement setting(s) {sorted(unknown)}")
    settings = {**_STEP_DEFAULTS, **refine_kwargs}
    _check(family, x, lam, settings["method"])
    settings["momentum"] = _default_momentum(settings["method"], settings["momentum"])
    settings["max_grad_norm"] = _default_clip(settings["method"], settings["max_grad_norm"])
    if wanted[0] == 0:
        yield 0, lam.detach(), 0.0
    seconds, start = 0.0, time.perf_counter()
    refined = _steps(model, family, x, lam, wanted[-1], create_graph=False, **settings)
    for k, lam_k in enumerate(refined, start=1):
        if k in wanted:
            seconds += time.perf_counter() - start
            yield k, lam_k, seconds
            start = time.perf_counter()


def refinement_curve(
    model: LatentVariableModel,
    family: VariationalFamily,
    x: Tensor,
    lam: Tensor,
    *,
    steps: Sequence[int] = (0, 1, 2, 5, 10, 20, 50, 100),
    elbo_samples: int = 1000,
    **refine_kwargs,
) -> list[RefinementPoint]:
    """L[q] after each number of refinement steps in ``steps``, from ``lam`` (the encoder's).

    The refinement runs once, to ``max(steps)``; the bound is evaluated (with
    ``elbo_samples`` draws) where the curve asks, and the time per datapoint counts the
    refinement steps only.
    """
    n, points = x.shape[0], []
    for k, lam_k, seconds in refinement_path(model, family, x, lam, steps, **refine_kwargs):
        with torch.no_grad():
            value, se = elbo(model, family, lam_k, x, elbo_samples, stderr=True)
        mean, stderr = float(value.mean()), float(se.square().sum().sqrt() / n)
        points.append(RefinementPoint(k, mean, stderr, seconds / n))
    return points
