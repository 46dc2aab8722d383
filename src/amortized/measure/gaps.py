r"""The inference-gap decomposition of Cremer, Li & Duvenaud (2018).

For a datapoint x, an encoder's q and the best member q* of its family,

    log p(x) - L[q] = (log p(x) - L[q*])  +  (L[q*] - L[q])
    inference gap   =  approximation gap  +  amortization gap.

The approximation gap is what the family cannot express; the amortization gap is what
one shared encoder loses against optimising every datapoint's lambda separately.
:func:`gap_report` measures all three on the same model and data, and the wall-clock
price of each inference route. Each route it measures is an object that yields lambda
for a block of rows (the encoder's one pass, K refinement steps from it, the optimum q*
of each family), each estimate of log p(x) another (IWAE, AIS); every L[q] is then the
same ELBO evaluation, and the rows are held by what they measured (:class:`PerDatapoint`).

Every mean carries two errors (:class:`Quantity`): Monte Carlo error, from the random
draws of the estimates, and sampling error over datapoints, from which n datapoints were
measured. A difference between two reports (:func:`difference`: model against model on
the same data, train against test) gets its own: paired where the datapoints are the
same, unpaired where they are not.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..distributed import World
from ..estimators import elbo, iwae_estimate
from ..families import VariationalFamily
from ..inference.local import fit_local
from ..inference.refine import refinement_path
from ..model import LatentVariableModel
from .ais import ais
from .quantities import PerDatapoint, Rows, _tighter
from .report import GapReport, _summarise, data_digest, merge_reports

__all__ = ["GapReport", "gap_report", "merge_reports"]


def _slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def gap_report(
    model: LatentVariableModel,
    x: Tensor,
    encoder: nn.Module,
    family: VariationalFamily,
    *,
    families: Sequence[VariationalFamily] = (),
    iwae_k: int = 5000,
    ais_steps: int = 0,
    ais_chains: int = 16,
    elbo_samples: int = 1000,
    local_kwargs: dict[str, Any] | None = None,
    local_init: str = "encoder",
    refine_steps: Sequence[int] = (),
    refine_kwargs: dict[str, Any] | None = None,
    batch_size: int = 500,
    seed: int | None = None,
    world: World | None = None,
    progress: bool = False,
) -> GapReport:
    r"""Decompose log p(x) - L[q] into approximation and amortization gaps on data x.

    Arguments:
        model: the trained generative model, held fixed.
        x: data, ``(n, *data_shape)``.
        encoder: maps x to the parameters of ``family``.
        family: the encoder's variational family; its per-datapoint optimum q* gives the
            amortization gap.
        families: further families to optimise per datapoint (their L[q*] and
            approximation gaps are reported beside the encoder family's).
        iwae_k: samples of the IWAE estimate of log p(x), drawn from the best q* (the
            family with the highest mean L[q*]).
        ais_steps: if > 0, also estimate log p(x) by annealed importance sampling from the
            best q* with this many steps and ``ais_chains`` chains; the report then
            uses whichever of IWAE and AIS is tighter on average (both are lower bounds).
        elbo_samples: samples for each evaluation of L[q] and L[q*].
        local_kwargs: keyword arguments for :func:`amortized.fit_local`.
        local_init: "encoder" starts q* of ``family`` at the encoder's output and q* of
            every other family at the Gaussian moment-matched to it (so a family that
            contains the diagonal Gaussian starts where the diagonal q* ended); "prior"
            starts every family at the prior.
        refine_steps: numbers of steps K at which to report L[q] of the encoder's output
            refined by K gradient steps (:func:`amortized.refine`, with
            ``refine_kwargs``): the refinement curve from L[q] (K = 0) toward L[q*].
        batch_size: the data are measured in blocks of this many consecutive rows.
        seed: if given, every block draws its random numbers from its own stream, seeded
            by (seed, block), and the caller's random state is left as it was: the report
            is then the same however the blocks are shared among processes. If None,
            the blocks draw in turn from the global stream.
        world: the processes to share the blocks among (:func:`amortized.distributed.init`
            under torchrun; needs ``seed``). Each process measures the blocks b with
            b % size == rank, and every process returns the whole report, equal to what
            one process measures with the same seed.

    Returns:
        A :class:`GapReport`: its means with their two errors, and in
        ``report.per_datapoint`` every row's estimates by what they measured;
        ``report.to_json()`` serialises it.
    """
    if local_init not in ("encoder", "prior"):
        raise ValueError(f"local_init must be 'encoder' or 'prior', got {local_init!r}")
    if iwae_k < 2 or elbo_samples < 2:
        raise ValueError("iwae_k and elbo_samples must be >= 2 (standard errors need two draws)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    world = world or World()
    if world.size > 1 and seed is None:
        raise ValueError("a gap report shared among processes needs a seed")
    local_kwargs = dict(local_kwargs or {})
    local_batch = local_kwargs.pop("batch_size", None)  # memory, not results: not a setting
    refine_kwargs = dict(refine_kwargs or {})
    n = x.shape[0]
    blocks = _slices(n, batch_size)
    all_families = [family, *[f for f in families if f.name != family.name]]
    ks = sorted(set(refine_steps))
    local = {"kwargs": local_kwargs, "batch_size": local_batch, "progress": progress}
    routes: list[_Route] = [  # in the order they draw: each may start where one before ended
        _Encoder(family, encoder),
        *([_Refinement(family, ks, refine_kwargs)] if ks else []),
        *[_Optimum(fam, _start(fam, family, local_init), **local) for fam in all_families],
    ]
    estimators: list[_LogPx] = [_IWAE(iwae_k)]
    if ais_steps > 0:
        estimators.append(_AIS(ais_steps, ais_chains))
    with _evaluating(model, encoder):
        rows, seconds, best = _measure(model, x, routes, estimators, blocks, elbo_samples,
                                       seed, world)  # fmt: skip
    per = _per_datapoint(rows, x.device)
    estimates = {e.name: e.describe(best) for e in estimators}
    # cost per datapoint: the time all processes spent on a route, over the datapoints
    seconds = {label: distributed.all_sum(cost, world) / n for label, cost in seconds.items()}
    fit_stats = {
        route.family.name: {
            key: distributed.all_sum(total, world) / n
            for key, total in zip(("mean_steps", "converged_fraction", "mean_remaining"),
                                  route.sums, strict=True)  # fmt: skip
        }
        for route in routes
        if isinstance(route, _Optimum)
    }
    report = _summarise(
        per,
        encoder_family=family.name,
        estimates=estimates,
        seconds=seconds,
        settings={
            "iwae_k": iwae_k,
            "ais_steps": ais_steps,
            "ais_chains": ais_chains,
            "elbo_samples": elbo_samples,
            "local_init": local_init,
            "local_kwargs": local_kwargs,
            "refine_kwargs": refine_kwargs,
            "log_px_methods": estimates,
            "stderr": "mc_se: Monte Carlo standard error of the mean; data_se: its "
            "sampling error over the datapoints",
            "samples": {"iwae": iwae_k, "ais": ais_chains},  # weights per row of each
        },
        local_fit=fit_stats,
        data_id=data_digest(x),
    )
    for message in report.warnings():
        warnings.warn(message, stacklevel=2)
    return report


def _measure(model, x, routes, estimators, blocks, elbo_samples, seed, world):
    """Every route's L[q] and every estimate of log p(x) on this process's blocks: (each
    block's rows, on every process; seconds per cost label; the family log p(x) was
    estimated from)."""
    labels = [label for route in routes for label in route.labels()] + [e.name for e in estimators]
    seconds = dict.fromkeys(labels, 0.0)
    mine = {b: _Block(x[blocks[b]]) for b in range(world.rank, len(blocks), world.size)}
    for b, block in mine.items():  # every route that needs no choice across blocks
        with _block_stream(seed, b, 0, x.device):
            for route in routes:
                for where, label, lam, cost in route.lams(model, block):
                    block.lam[where] = lam
                    seconds[label] += cost
                    with torch.no_grad():
                        block.rows[where] = elbo(model, route.family, lam, block.x,
                                                 elbo_samples, stderr=True)  # fmt: skip
    # log p(x) from the best q* (highest mean L[q*] over all the data)
    families = [route.family for route in routes if isinstance(route, _Optimum)]
    local_bounds = _gather_blocks(
        {b: {f.name: block.rows[_Optimum.where(f)][0] for f in families}
         for b, block in mine.items()}, world,
    )  # fmt: skip
    best = max(families, key=lambda f: float(
        torch.cat([local_bounds[b][f.name] for b in sorted(local_bounds)]).mean()))  # fmt: skip
    for b, block in mine.items():
        lam = block.lam[_Optimum.where(best)].detach()
        with _block_stream(seed, b, 1, x.device), torch.no_grad():
            for estimator in estimators:
                start = time.perf_counter()
                block.rows[("log_px", estimator.name)] = estimator(model, best, lam, block.x)
                seconds[estimator.name] += time.perf_counter() - start
    gathered = _gather_blocks({b: block.rows for b, block in mine.items()}, world)
    return [gathered[b] for b in range(len(blocks))], seconds, best


@contextlib.contextmanager
def _evaluating(*modules: nn.Module):
    """The modules in eval mode, then back in the modes they were in."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


# What a report measures is held by where it goes: ("elbo_amortized", None),
# ("elbo_refined", K), ("elbo_local", family name) or ("log_px", estimate name).
Where = tuple[str, Any]


@dataclass
class _Block:
    """One block of consecutive rows being measured: its data, the lambda each route
    found for it, and each estimate's (values, Monte Carlo errors)."""

    x: Tensor
    lam: dict[Where, Tensor] = field(default_factory=dict)
    rows: dict[Where, tuple[Tensor, ...]] = field(default_factory=dict)


class _Route:
    """A way of computing lambda for a block that the report measures: the lambdas it
    yields, each with where its L[q] goes, the label of its cost and the seconds it took."""

    family: VariationalFamily

    def labels(self) -> list[str]:
        raise NotImplementedError

    def lams(self, model: LatentVariableModel, block: _Block
             ) -> Iterator[tuple[Where, str, Tensor, float]]:  # fmt: skip
        raise NotImplementedError


@dataclass
class _Encoder(_Route):
    """Amortized inference: lambda = encoder(x), one forward pass."""

    family: VariationalFamily
    encoder: nn.Module
    where: ClassVar[Where] = ("elbo_amortized", None)

    def labels(self):
        return ["encoder"]

    def lams(self, model, block):
        start = time.perf_counter()
        with torch.no_grad():
            lam = self.encoder(block.x)
        yield self.where, "encoder", lam, time.perf_counter() - start


@dataclass
class _Refinement(_Route):
    """K gradient steps from the encoder's output (:func:`amortized.refine`), for each K."""

    family: VariationalFamily
    steps: list[int]
    kwargs: dict[str, Any]

    def labels(self):
        return [f"refine/{k}" for k in self.steps]

    def lams(self, model, block):
        start = block.lam[_Encoder.where]
        for k, lam, cost in refinement_path(model, self.family, block.x, start, self.steps,
                                            **self.kwargs):  # fmt: skip
            yield ("elbo_refined", k), f"refine/{k}", lam, cost


@dataclass
class _Optimum(_Route):
    """lambda_i optimised for each datapoint in a family (:func:`amortized.fit_local`),
    from ``start(block)`` (None: the prior); ``sums`` adds up its rows' steps, rows
    converged and what more steps would gain."""

    family: VariationalFamily
    start: Callable[[_Block], Tensor | None]
    kwargs: dict[str, Any]
    batch_size: int | None
    progress: bool
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    @staticmethod
    def where(family: VariationalFamily) -> Where:
        return ("elbo_local", family.name)

    def labels(self):
        return [f"local/{self.family.name}"]

    def lams(self, model, block):
        init = self.start(block)
        start = time.perf_counter()
        fit = fit_local(model, self.family, block.x, init, batch_size=self.batch_size,
                        progress=self.progress, **self.kwargs)  # fmt: skip
        cost = time.perf_counter() - start
        self.sums[0] += float(fit.steps.float().sum())
        self.sums[1] += float(fit.converged.float().sum())
        self.sums[2] += float(fit.remaining.clamp(max=1e6).sum())
        yield self.where(self.family), f"local/{self.family.name}", fit.lam, cost


def _start(fam: VariationalFamily, encoder_family: VariationalFamily, local_init: str
           ) -> Callable[[_Block], Tensor | None]:  # fmt: skip
    """Where q* of ``fam`` starts: with ``local_init="encoder"``, the encoder family's at
    the encoder's output and every other family's at the Gaussian moment-matched to the
    encoder family's q*; with "prior", the prior."""
    if local_init == "prior":
        return lambda block: None
    if fam.name == encoder_family.name:
        return lambda block: block.lam[_Encoder.where]

    def moment_matched(block: _Block) -> Tensor:
        lam = block.lam[_Optimum.where(encoder_family)]
        return fam.from_gaussian(*encoder_family.gaussian_moments(lam))

    return moment_matched


class _LogPx:
    """An estimate of log p(x) from a proposal q*: ``(log_px, stderr, khat, remaining)``
    per row."""

    name: ClassVar[str]

    def __call__(self, model, family, lam, x) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def describe(self, family: VariationalFamily) -> str:
        raise NotImplementedError


@dataclass
class _IWAE(_LogPx):
    k: int
    name: ClassVar[str] = "iwae"

    def __call__(self, model, family, lam, x):
        est = iwae_estimate(model, family, lam, x, self.k)
        return est.log_px, est.stderr, est.khat, est.remaining

    def describe(self, family):
        return f"IWAE, k={self.k}, proposal q* ({family.name})"


@dataclass
class _AIS(_LogPx):
    steps: int
    chains: int
    name: ClassVar[str] = "ais"

    def __call__(self, model, family, lam, x):
        result = ais(model, x, family, lam, steps=self.steps, chains=self.chains)
        return result.log_px, result.stderr, result.khat, result.remaining

    def describe(self, family):
        return f"AIS, {self.steps} steps x {self.chains} chains, HMC, from q* ({family.name})"


def _per_datapoint(blocks: list[dict[Where, tuple[Tensor, ...]]], device: torch.device
                   ) -> PerDatapoint:  # fmt: skip
    """Every block's estimates, joined row after row, held by what they measured."""
    joined = {where: Rows(*(torch.cat([blk[where][i].to(device) for blk in blocks])
                            for i in range(len(values))))
              for where, values in blocks[0].items()}  # fmt: skip

    def of(kind: str) -> dict:
        return {name: rows for (k, name), rows in joined.items() if k == kind}

    estimates = of("log_px")
    return PerDatapoint(elbo_amortized=joined[_Encoder.where], elbo_local=of("elbo_local"),
                        log_px_estimates=estimates, log_px_chosen=_tighter(estimates),
                        elbo_refined=of("elbo_refined"))  # fmt: skip


@contextlib.contextmanager
def _block_stream(seed: int | None, block: int, stage: int, device: torch.device):
    """Draw from a stream of the block's own, seeded by (seed, block, stage), then restore
    the caller's random state; without a seed, draw from the global stream."""
    if seed is None:
        yield
        return
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(((seed * 1_000_003 + block) * 2 + stage) % 2**63)
        yield


def _gather_blocks(mine: dict[int, Any], world: World) -> dict[int, Any]:
    """Every process's ``{block: value}`` merged, on every process (tensors on the CPU)."""
    if world.size == 1:
        return mine
    def cpu(v):
        if isinstance(v, tuple):
            return tuple(cpu(t) for t in v)
        return v.cpu() if isinstance(v, Tensor) else v

    on_cpu = {b: {k: cpu(v) for k, v in values.items()} for b, values in mine.items()}
    return {b: v for part in distributed.all_gather_objects(on_cpu, world) for b, v in part.items()}
