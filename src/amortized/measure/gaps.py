r"""The inference-gap decomposition of Cremer, Li & Duvenaud (2018).

For a datapoint x, an encoder's q and the best member q* of its family,

    log p(x) - L[q] = (log p(x) - L[q*])  +  (L[q*] - L[q])
    inference gap   =  approximation gap  +  amortization gap.

The approximation gap is what the family cannot express; the amortization gap is what
one shared encoder loses against optimising every datapoint's lambda separately.
:func:`gap_report` measures all three on the same model and data, and the wall-clock
price of each inference route.

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
from collections.abc import Sequence
from typing import Any

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
from .report import GapReport, _summarise, data_digest, merge_reports

__all__ = ["GapReport", "gap_report", "merge_reports"]


def _slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _in_batches(fn, n: int, batch_size: int) -> tuple[Tensor, Tensor]:
    outs = [fn(s) for s in _slices(n, batch_size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


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
        A :class:`GapReport`; ``report.to_json()`` serialises it.
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
    mine = range(world.rank, len(blocks), world.size)
    all_families = [family, *[f for f in families if f.name != family.name]]
    ks = sorted(set(refine_steps))
    routes = ["encoder", *[f"refine/{k}" for k in ks], *[f"local/{f.name}" for f in all_families],
              "iwae", *(["ais"] if ais_steps > 0 else [])]  # fmt: skip

    def draws(block: int, stage: int):
        return _block_stream(seed, block, stage, x.device)

    per: dict[int, dict[str, Tensor]] = {b: {} for b in mine}  # block -> key -> values
    lam_star: dict[int, dict[str, Tensor]] = {b: {} for b in mine}
    seconds: dict[str, float] = {}
    fit_sums = {fam.name: [0.0, 0.0, 0.0] for fam in all_families}  # steps, converged, remaining

    def spent(key: str, start: float) -> None:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

    was_training = (model.training, encoder.training)
    model.eval()
    encoder.eval()
    try:
        for b in mine:  # every route that needs no choice across blocks
            xb, out = x[blocks[b]], per[b]
            with draws(b, 0):
                with torch.no_grad():  # the amortized route: one forward pass
                    start = time.perf_counter()
                    lam_q = encoder(xb)
                    spent("encoder", start)
                    out["elbo_amortized"], out["elbo_amortized_se"] = elbo(
                        model, family, lam_q, xb, elbo_samples, stderr=True
                    )
                # K gradient steps from the encoder's output
                for k, lam_k, cost in refinement_path(model, family, xb, lam_q, ks,
                                                      **refine_kwargs) if ks else []:  # fmt: skip
                    with torch.no_grad():
                        value, se = elbo(model, family, lam_k, xb, elbo_samples, stderr=True)
                    out[f"elbo_refined/{k}"], out[f"elbo_refined/{k}_se"] = value, se
                    seconds[f"refine/{k}"] = seconds.get(f"refine/{k}", 0.0) + cost
                # lambda_i optimised for each datapoint, in each family
                for fam in all_families:
                    init = None  # the prior
                    if local_init == "encoder" and fam.name == family.name:
                        init = lam_q
                    elif local_init == "encoder":  # moment-match the encoder family's q*
                        init = fam.from_gaussian(*family.gaussian_moments(lam_star[b][family.name]))
                    start = time.perf_counter()
                    fit = fit_local(
                        model, fam, xb, init, batch_size=local_batch, progress=progress,
                        **local_kwargs,
                    )  # fmt: skip
                    spent(f"local/{fam.name}", start)
                    lam_star[b][fam.name] = fit.lam
                    fit_sums[fam.name][0] += float(fit.steps.float().sum())
                    fit_sums[fam.name][1] += float(fit.converged.float().sum())
                    fit_sums[fam.name][2] += float(fit.remaining.clamp(max=1e6).sum())
                    with torch.no_grad():
                        out[f"elbo_local/{fam.name}"], out[f"elbo_local/{fam.name}_se"] = elbo(
                            model, fam, fit.lam, xb, elbo_samples, stderr=True
                        )

        # log p(x) from the best q* (highest mean L[q*] over all the data)
        local = {b: {f.name: per[b][f"elbo_local/{f.name}"] for f in all_families} for b in mine}
        local = _gather_blocks(local, world)
        best = max(
            all_families,
            key=lambda f: float(torch.cat([local[b][f.name] for b in sorted(local)]).mean()),
        )
        for b in mine:
            xb, lam, out = x[blocks[b]], lam_star[b][best.name].detach(), per[b]
            with draws(b, 1), torch.no_grad():
                start = time.perf_counter()
                est = iwae_estimate(model, best, lam, xb, iwae_k)
                out["log_px_iwae"], out["log_px_iwae_se"] = est.log_px, est.stderr
                out["log_px_iwae_khat"], out["log_px_iwae_remaining"] = est.khat, est.remaining
                spent("iwae", start)
                if ais_steps > 0:
                    start = time.perf_counter()
                    result = ais(model, xb, best, lam, steps=ais_steps, chains=ais_chains)
                    out["log_px_ais"], out["log_px_ais_se"] = result.log_px, result.stderr
                    out["log_px_ais_khat"] = result.khat
                    out["log_px_ais_remaining"] = result.remaining
                    spent("ais", start)
    finally:
        model.train(was_training[0])
        encoder.train(was_training[1])

    estimates = {"iwae": f"IWAE, k={iwae_k}, proposal q* ({best.name})"}
    if ais_steps > 0:
        estimates["ais"] = (
            f"AIS, {ais_steps} steps x {ais_chains} chains, HMC, from q* ({best.name})"
        )
    gathered = _gather_blocks(per, world)
    everything = {
        key: torch.cat([gathered[b][key].to(x.device) for b in range(len(blocks))])
        for key in gathered[0]
    }
    chosen = max(estimates, key=lambda m: float(everything[f"log_px_{m}"].mean()))
    everything["log_px"] = everything[f"log_px_{chosen}"]
    everything["log_px_se"] = everything[f"log_px_{chosen}_se"]
    # cost per datapoint: the time all processes spent on a route, over the datapoints
    seconds = {key: distributed.all_sum(seconds.get(key, 0.0), world) / n for key in routes}
    fit_stats = {}
    for name, (steps, converged, remaining) in fit_sums.items():
        fit_stats[name] = {
            "mean_steps": distributed.all_sum(steps, world) / n,
            "converged_fraction": distributed.all_sum(converged, world) / n,
            "mean_remaining": distributed.all_sum(remaining, world) / n,
        }

    report = _summarise(
        everything,
        encoder_family=family.name,
        families=[fam.name for fam in all_families],
        estimates=estimates,
        chosen=chosen,
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
            "samples": {"iwae": iwae_k, "ais": ais_chains},
        },
        local_fit=fit_stats,
        data_id=data_digest(x),
    )
    for message in report.warnings():
        warnings.warn(message, stacklevel=2)
    return report


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
    on_cpu = {
        b: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in values.items()}
        for b, values in mine.items()
    }
    return {b: v for part in distributed.all_gather_objects(on_cpu, world) for b, v in part.items()}
