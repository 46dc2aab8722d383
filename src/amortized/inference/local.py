r"""Per-datapoint variational inference: optimise a free lambda_i for every datapoint.

Classical (non-amortized) VI fits q(z; lambda_i) to p(z | x_i) by gradient ascent on
that datapoint's ELBO (Hoffman et al. 2013; Cremer, Li & Duvenaud 2018 call the optimum
q*). Because the objective of a batch is a *sum* of per-datapoint ELBOs, the gradient
with respect to row i of ``lam`` depends on x_i alone, so one vectorised optimiser fits
thousands of independent problems at once: :class:`amortized.inference.optimiser.LambdaOptimiser`,
with its own Adam state, step size and stopping rule per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..families import VariationalFamily
from ..model import LatentVariableModel
from .optimiser import AdamState, LambdaOptimiser, LocalFit, adam_step

__all__ = ["fit_local", "LocalFit", "AdamState", "adam_step"]


def fit_local(
    model: LatentVariableModel,
    family: VariationalFamily,
    x: Tensor,
    init: Tensor | None = None,
    *,
    steps: int = 2000,
    lr: float = 0.02,
    samples: int = 8,
    check_every: int | None = None,
    tol: float = 0.01,
    lr_decay: float = 0.5,
    max_decays: int = 4,
    check_samples: int = 256,
    restart_ratio: float = 0.1,
    batch_size: int | None = None,
    analytic_kl: bool = True,
    progress: bool = False,
) -> LocalFit:
    r"""Fit lambda_i for every row of x by stochastic gradient ascent on its own ELBO.

    Each row takes scale-free Adam steps (in units of the family's
    :meth:`~amortized.families.VariationalFamily.step_scale`, so a mean moves relative to
    q's width) with its own step size. Every ``check_every`` steps its ELBO is estimated
    from a fixed set of ``check_samples`` draws; a row that did not gain more than ``tol``
    nats over its best iterate multiplies its step size by ``lr_decay`` and restarts its
    Adam moments (as it also does when its gradients' scale has fallen tenfold,
    ``restart_ratio``). After ``max_decays`` plateaus the row has converged and stops (it
    costs nothing from then on). No row runs more than ``steps`` steps, and each returns
    its best iterate. Model parameters get no gradients. See
    :mod:`amortized.inference.optimiser`.

    Arguments:
        model: the generative model p(x, z), held fixed.
        family: the variational family q(z; lambda).
        x: data, ``(batch, *data_shape)``.
        init: starting parameters ``(batch, num_params)`` (e.g. an encoder's output);
            the prior's parameters by default.
        lr: Adam's step size, in units of each entry's step scale.
        samples: reparameterized samples per gradient estimate.
        check_every: steps between checks; by default the family's ``check_every``
            (50 for the Gaussians, 100 for the IAF).
        tol: with ``-inf`` no row can plateau, every row takes every step, the checks draw
            nothing and the result is the last iterate.
        batch_size: rows optimised together (all of x by default); rows are independent,
            so this changes memory and speed, never the answer's distribution.

    Returns:
        A :class:`LocalFit`: each row's best iterate, whether it converged, and
        ``remaining``, what more steps would still gain.

    Example:
        >>> import torch
        >>> from amortized import LatentVariableModel, DiagonalGaussian
        >>> from amortized.nets.decoders import GaussianMLPDecoder
        >>> model = LatentVariableModel(GaussianMLPDecoder(2, 3, hidden=(4,), scale=1.0), 2)
        >>> fit = fit_local(model, DiagonalGaussian(2), torch.randn(5, 3), steps=100)
        >>> fit.lam.shape
        torch.Size([5, 4])
    """
    n = x.shape[0]
    check_every = family.check_every if check_every is None else check_every
    if init is None:
        init = family.prior_init(n, device=x.device, dtype=x.dtype)
    if init.shape != (n, family.num_params):
        raise ValueError(
            f"init must have shape ({n}, {family.num_params}), got {tuple(init.shape)}"
        )
    if steps < 1 or check_every < 1 or samples < 1 or check_samples < 1:
        raise ValueError("steps, check_every, samples and check_samples must be >= 1")
    batch_size = batch_size or n
    settings = dict(lr=lr, samples=samples, check_every=check_every, tol=tol,
                    lr_decay=lr_decay, max_decays=max_decays, check_samples=check_samples,
                    restart_ratio=restart_ratio, analytic_kl=analytic_kl)  # fmt: skip
    parts = [
        LambdaOptimiser(model, family, x[i : i + batch_size], init[i : i + batch_size],
                        **settings).run(steps, progress=progress)  # fmt: skip
        for i in range(0, n, batch_size)
    ]
    trace: dict[str, list[float]] = {"step": [], "elbo": [], "active": []}
    for part in parts:  # concatenate block traces (blocks run one after another)
        for key in trace:
            trace[key] += part.trace[key]
    return LocalFit(
        lam=torch.cat([p.lam for p in parts]),
        elbo=torch.cat([p.elbo for p in parts]),
        steps=torch.cat([p.steps for p in parts]),
        converged=torch.cat([p.converged for p in parts]),
        remaining=torch.cat([p.remaining for p in parts]),
        trace=trace,
    )
