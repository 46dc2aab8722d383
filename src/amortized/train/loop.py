"""Train a VAE (decoder and amortized encoder together) on the ELBO or the IWAE bound.

The loop reads top to bottom: shuffle, (re)binarize, step on the bound with a warmed-up
KL weight, evaluate on the validation split, keep the best weights, stop early, and
write a checkpoint atomically at the end of every epoch. A run killed at any point
resumes from its last checkpoint and, because every random stream (parameter init,
data order, binarization, reparameterization noise) is restored, ends exactly where an
uninterrupted run with the same seed ends.

Run directory layout::

    config.toml      the TrainConfig that ran
    metrics.jsonl    one JSON line per epoch
    checkpoint.pt    everything needed to resume (written atomically)
    model.pt         the best weights on validation, written when training ends
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..config import ConfigError, TrainConfig, load_config, save_config, to_dict
from ..data import Dataset, binarize, load_dataset
from ..data.splits import evaluation_subset, prepare_split
from ..files import lock_directory
from ..inference.routes import ROUTES, route_for
from ..measure.diagnostics import collapse_warning, latent_diagnostics
from ..measure.gaps import gap_report
from ..nets.layers import adam
from .bounds import (  # noqa: F401 - training_bounds, evaluate_elbo: the package's names
    DIAGNOSTICS_STREAM,
    _Bounds,
    _objective,
    evaluate_elbo,
    free_bits_kl,
    own_stream,
    training_bounds,
    validation_elbo,
)
from .checkpoint import load_checkpoint, save_atomic
from .factory import build, validate
from .fit import fit_epochs
from .run import Trained, _completed, _identity
from .schedules import kl_weight, learning_rate

__all__ = ["train", "training_bounds", "evaluate_elbo", "CHECKPOINT_FORMAT", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """Training left the finite numbers: most steps of an epoch failed, or weights did."""

CHECKPOINT_FORMAT = "amortized-train-v1"
#: What the gaps over training are measured with (``gap_every``): the study's estimates,
#: smaller, on a few points; each measurement seeded by the run's seed.
GAPS_OVER_TRAINING = {"iwae_k": 1000, "elbo_samples": 200,
                      "local_kwargs": {"steps": 500, "lr": 0.02, "samples": 8}}  # fmt: skip
log = logging.getLogger(__name__)  # shown by the command line; silent in a library


#: He et al. (2019): at most this many encoder-only steps per decoder step, and the
#: encoder's loss is compared between consecutive windows of ``AGGRESSIVE_WINDOW`` steps.
AGGRESSIVE_MAX_STEPS, AGGRESSIVE_WINDOW = 100, 15


def _aggressive_encoder_steps(config, model, encoder, family, optimizer, draw, beta) -> int:
    """Encoder-only steps on fresh minibatches from ``draw()`` until the encoder's mean
    loss over a window of steps is no lower than over the window before (He, Spokoyny,
    Neubig & Berg-Kirkpatrick 2019); returns the number of steps taken."""
    previous, window = math.inf, []
    for taken in range(1, AGGRESSIVE_MAX_STEPS + 1):
        xb = draw()
        loss = -_objective(config, model, family, encoder(xb), xb, beta).mean()
        optimizer.zero_grad(set_to_none=True)
        _backward(loss, encoder.parameters())
        if torch.isfinite(loss) and _finite_gradients(optimizer, config.grad_clip):
            optimizer.step()
        window.append(float(loss.detach()))
        if len(window) == AGGRESSIVE_WINDOW:
            current = sum(window) / len(window)
            if current >= previous:
                return taken
            previous, window = current, []
    return AGGRESSIVE_MAX_STEPS


def _latent_record(model, encoder, family, x: Tensor, epoch: int, seed: int,
                   warn: bool = True) -> dict:  # fmt: skip
    """KL, KL per dimension, active units and I(x; z) of the encoder's q on x; warns on
    collapse (:func:`amortized.measure.diagnostics.collapse_warning`) when ``warn``."""
    with torch.no_grad(), own_stream(seed + DIAGNOSTICS_STREAM, x.device):
        diag = latent_diagnostics(family, encoder(x), model.prior)
    message = collapse_warning(diag)
    if message is not None and warn:
        warnings.warn(f"epoch {epoch}: {message}", stacklevel=2)
    return {
        "kl": diag.kl,
        "active_units": diag.active_units,
        "mutual_information": diag.mutual_information,
        "collapsing": message is not None,
        "kl_per_dim": diag.kl_per_dim,
    }


def _finite_gradients(optimizer: torch.optim.Optimizer, max_norm: float = 0.0) -> bool:
    """Whether every gradient the optimizer would apply is finite (one device sync); when
    they are and ``max_norm > 0``, scales them down to at most that total norm.

    Without clipping, the check is the one fused pass of mixed-precision training
    (``torch.amp``'s non-finite check, unscaling by exactly 1): the total norm's
    per-tensor passes made a training step of the default VAE about 9% slower
    (``benchmarks/throughput.py``)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    if max_norm <= 0:
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device)  # 1 at any inf, NaN
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, found.new_ones(()))
        return not bool(found)
    norm = torch.nn.utils.get_total_norm(grads)
    if not bool(norm.isfinite()):
        return False
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return True


def _backward(loss: Tensor, parameters) -> None:
    """Accumulate d loss / d parameter into ``.grad`` of these parameters only."""
    params = [p for p in parameters if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _VAEEpochs:
    """The VAE's epochs for :func:`amortized.train.fit.fit_epochs`: minibatch steps on the
    route's bounds, validation, early stopping, and the state that resumes them."""

    def __init__(self, config: TrainConfig, model, encoder, family, route, world, device,
                 train_x: Tensor, valid_x: Tensor, dynamic: bool, diagnostics_x,
                 gap_x: dict[str, Tensor] | None = None):  # fmt: skip
        self.config, self.model, self.encoder, self.family = config, model, encoder, family
        self.route, self.world, self.device = route, world, device
        self.train_x, self.valid_x, self.dynamic = train_x, valid_x, dynamic
        self.diagnostics_x = diagnostics_x  # where the latent code's use is checked
        self.gap_x = gap_x or {}  # split -> where the gaps are measured over training
        self.optimizer = adam([*model.parameters(), *encoder.parameters()], config.lr)
        self.bounds: nn.Module = _Bounds(config, model, encoder, family, route)
        if world.size > 1:  # averages the gradients of every backward pass across processes
            ids = [device.index] if device.type == "cuda" else None
            self.bounds = DistributedDataParallel(self.bounds, device_ids=ids)
        self.order_rng = torch.Generator().manual_seed(config.seed)
        self.binarize_rng = torch.Generator(device).manual_seed(config.seed + 1)
        self.steps_per_epoch = math.ceil(train_x.shape[0] / config.batch_size)
        self.epoch, self.step, self.best, self.bad_epochs = 0, 0, -math.inf, 0
        self.aggressive, self.last_mi = config.aggressive, -math.inf  # He et al.'s switch
        self.warned_collapse = False  # once a run (again after a resume at most)
        self.best_state = {"model": _clone_state(model), "encoder": _clone_state(encoder)}

    def done(self) -> bool:
        return self.epoch >= self.config.epochs or self.bad_epochs >= self.config.patience

    def state(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "order": self.order_rng.get_state(),
            "binarize": self.binarize_rng.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": to_dict(self.config),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "aggressive": self.aggressive,
            "last_mi": self.last_mi,
            "model": self.model.state_dict(),
            "encoder": self.encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "rng": rng,
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.order_rng.set_state(state["rng"]["order"])
        device = self.binarize_rng.get_state().device
        self.binarize_rng.set_state(state["rng"]["binarize"].to(device))
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        self.bad_epochs, self.best_state = state["bad_epochs"], state["best_state"]
        self.aggressive = state.get("aggressive", False)
        self.last_mi = state.get("last_mi", -math.inf)

    def _minibatch(self, idx: Tensor) -> Tensor:  # (batch, data_dim), binarized if dynamic
        xb = self.train_x[idx.to(self.device)]
        return binarize(xb, generator=self.binarize_rng) if self.dynamic else xb

    def _draw(self) -> Tensor:  # a random minibatch for aggressive encoder steps
        n = self.train_x.shape[0]
        return self._minibatch(torch.randint(n, (self.config.batch_size,),
                                             generator=self.order_rng))  # fmt: skip

    def run_epoch(self) -> dict:
        config, world, model, encoder = self.config, self.world, self.model, self.encoder
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.epoch)
        model.train()
        encoder.train()
        total_loss, seen, skipped, encoder_steps, taken = 0.0, 0, 0, 0, 0
        if world.size > 1:  # each process its own noise, reproducible from (seed, epoch, rank)
            torch.manual_seed(config.seed + 7919 * self.epoch + 104729 * world.rank)
            self.binarize_rng.manual_seed(config.seed + 1 + 7919 * self.epoch + 104729 * world.rank)
        order = torch.randperm(self.train_x.shape[0], generator=self.order_rng)
        for idx in order.split(config.batch_size):
            if len(idx) < world.size:
                continue  # a last minibatch too small to share
            xb = self._minibatch(idx[world.rank :: world.size])  # this process's share
            beta = kl_weight(config, self.step + 1, self.steps_per_epoch)
            if self.aggressive:
                encoder_steps += _aggressive_encoder_steps(
                    config, model, encoder, self.family, self.optimizer, self._draw, beta
                )
            self.step += 1
            taken += 1
            loss = self._step(xb, beta)
            if loss is None:
                skipped += 1
                continue
            total_loss += loss * xb.shape[0]
            seen += xb.shape[0]
        model.eval()
        encoder.eval()
        self._check_diverged(skipped, taken)
        valid = validation_elbo(model, encoder, self.family, self.valid_x, config, world)
        if world.size > 1:
            total_loss = distributed.all_sum(total_loss, world)
            seen = distributed.all_sum(seen, world)
        self.epoch += 1
        if valid > self.best:
            self.best, self.bad_epochs = valid, 0
            self.best_state = {"model": _clone_state(model), "encoder": _clone_state(encoder)}
        else:
            self.bad_epochs += 1
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "beta": beta,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": total_loss / seen if seen else float("nan"),  # over steps taken
            "valid_elbo": valid,
            "best_valid_elbo": self.best,
            "skipped_steps": skipped,
            "seconds": time.perf_counter() - start,
        }
        if self.diagnostics_x is not None and world.main:
            # warned of once, after the KL warm-up (during it a small KL is the schedule's
            # doing); a decoder cut off from z collapses the code by design: logged only
            warn = config.decoder_uses_z and beta >= 1.0 and not self.warned_collapse
            record.update(_latent_record(model, encoder, self.family, self.diagnostics_x,
                                         self.epoch, config.seed, warn=warn))  # fmt: skip
            self.warned_collapse |= warn and record["collapsing"]
        if self.gap_x and self.epoch % config.gap_every == 0 and world.main:
            record["gaps"] = self._gaps()
        if config.aggressive:
            record.update(aggressive=self.aggressive, encoder_steps=encoder_steps)
            if self.aggressive and record["mutual_information"] <= self.last_mi:
                self.aggressive = False  # I(x; z) stopped rising: a plain VAE from here
            self.last_mi = record["mutual_information"]
        return record

    def _gaps(self) -> dict[str, dict[str, float]]:
        """The gaps of the model as it is now on the fixed subsets (:data:`GAPS_OVER_TRAINING`
        settings, seeded, so training's random streams are untouched)."""
        out = {}
        for split, x in self.gap_x.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence notes belong to final reports
                report = gap_report(self.model, x, self.encoder, self.family, seed=self.config.seed,
                                    **GAPS_OVER_TRAINING)  # fmt: skip
            out[split] = {
                "log_px": report.log_px.mean,
                "elbo_local": report.elbo_local[self.family.name].mean,
                "elbo_amortized": report.elbo_amortized.mean,
                "approximation": report.approximation_gap[self.family.name].mean,
                "amortization": report.amortization_gap.mean,
                "approximation_mc_se": report.approximation_gap[self.family.name].mc_se,
                "amortization_mc_se": report.amortization_gap.mc_se,
            }
        return out

    def _check_diverged(self, skipped: int, taken: int) -> None:
        """Stop, before this epoch is saved, where most steps failed or a weight is no
        longer finite: a diverged run must not end as if it had trained."""
        params = [*self.model.parameters(), *self.encoder.parameters()]
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        if finite and 2 * skipped <= taken:
            return
        what = (f"{skipped} of {taken} steps had a non-finite loss or gradient"
                if finite else "weights became non-finite")  # fmt: skip
        raise TrainingDiverged(
            f"training diverged in epoch {self.epoch + 1}: {what}; nothing of this epoch was "
            f"saved. Lower --lr (now {self.config.lr:g}) or set --grad-clip"
        )

    def _step(self, xb: Tensor, beta: float) -> float | None:
        """One optimiser step on the route's bounds; the loss, or None where it or its
        gradient is not finite and the step is skipped (on every process alike)."""
        world, optimizer, model, encoder = self.world, self.optimizer, self.model, self.encoder
        model_bound, encoder_bound = self.bounds(xb, beta)
        if self.aggressive:  # the encoder has had its steps: this one is the decoder's
            encoder_bound = None
        loss = -model_bound.mean()
        encoder_loss = None if encoder_bound is None else -encoder_bound.mean()
        value = float(loss.detach())  # the one device sync of the forward pass
        finite = math.isfinite(value) and (encoder_loss is None or bool(encoder_loss.isfinite()))
        if not distributed.all_agree(finite, world):  # every process skips, or none
            warnings.warn(f"non-finite loss at step {self.step}; step skipped", stacklevel=1)
            if world.size > 1:  # DDP expects a backward pass after every forward
                zero = sum(p.sum() for p in self.bounds.parameters()) * 0.0
                zero.backward()
                optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.zero_grad(set_to_none=True)
        if encoder_bound is model_bound:
            loss.backward()
        else:  # each part learns from its own bound
            _backward(loss, model.parameters())
            if encoder_loss is not None:
                _backward(encoder_loss, encoder.parameters())
        if not _finite_gradients(optimizer, self.config.grad_clip):
            warnings.warn(f"non-finite gradient at step {self.step}; step skipped", stacklevel=1)
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step()
        return value


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    dataset: Dataset | None = None,
) -> Trained:
    """Train (or resume training) a VAE in ``run_dir``; returns the best model on validation.

    Under torchrun (``WORLD_SIZE`` > 1) every process trains on its share of each minibatch
    and DistributedDataParallel averages the gradients (:mod:`amortized.distributed`);
    rank 0 writes the run directory.
    """
    validate(config)
    route = route_for(config)
    if distributed.requested_size() > 1 and (not route.shared_objective or config.aggressive):
        shared = tuple(name for name, r in ROUTES.items() if r.shared_objective)
        raise ConfigError(
            f"distributed training supports inference {shared} without aggressive training "
            "(their encoder and model share one objective)"
        )
    world = distributed.init(torch.device(config.device).type)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_directory(run_dir) if world.main else contextlib.nullcontext():
        return _train_in(config, route, world, run_dir, dataset)


def _holds_another_run(run_dir: Path, config: TrainConfig) -> bool:
    """Whether run_dir holds the results of a run other than this config's."""
    model = run_dir / "model.pt"
    if model.exists():  # a finished run: ours only if its config is
        saved = load_checkpoint(model)["config"]
        return _identity(_completed(saved)) != _identity(to_dict(config))
    if not (run_dir / "metrics.jsonl").exists():
        return False
    try:  # epochs logged and nothing to resume them: ours if its config.toml is ours
        saved = to_dict(load_config(TrainConfig, run_dir / "config.toml"))
    except ConfigError:
        return True
    return _identity(_completed(saved)) != _identity(to_dict(config))


def _train_in(config: TrainConfig, route, world, run_dir: Path, dataset: Dataset | None
              ) -> Trained:  # fmt: skip
    """:func:`train` in a run directory this process holds."""
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.exists() and _holds_another_run(run_dir, config):
        raise ConfigError(
            f"{run_dir} holds another run, and its checkpoint.pt is missing; training there "
            "would replace it. Choose another --run-dir, or delete the directory to start afresh"
        )
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        saved, given = _identity(_completed(state["config"])), _identity(to_dict(config))
        differ = [f"{k} ({saved.get(k)!r} there, {given.get(k)!r} here)"
                  for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k)]
        if differ:
            raise ConfigError(
                f"{run_dir} holds a run with a different config: {'; '.join(differ[:3])}"
                f"{'; ...' if len(differ) > 3 else ''}. Resume it with the same settings or "
                "choose another --run-dir"
            )
    device = torch.device(config.device)  # one this machine has (validate checked)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dataset = dataset or load_dataset(config.dataset, config.data_dir or None)
    dynamic = config.likelihood == "bernoulli" and dataset.binarization == "dynamic"
    if dynamic and world.main:
        log.info("%s holds grey levels in [0, 1]: the Bernoulli model sees them binarized, "
                 "afresh at every training step and once, fixed, for evaluation", dataset.name)
    train_x = dataset.train if dynamic else prepare_split(dataset, "train", config.likelihood)
    train_x = train_x.to(device)
    whole_valid = prepare_split(dataset, "valid", config.likelihood, config.seed).to(device)
    valid_x = evaluation_subset(whole_valid, config.valid_points, config.seed)  # every epoch
    diagnostics_x = None  # where the latent code's use is checked every epoch
    if config.diagnostics_points and route.has_encoder:
        diagnostics_x = evaluation_subset(whole_valid, config.diagnostics_points, config.seed)

    gap_x = None  # where the gaps are measured every gap_every epochs
    if config.gap_every and route.has_encoder:
        fixed_train = prepare_split(dataset, "train", config.likelihood, config.seed)
        gap_x = {split: evaluation_subset(x, config.gap_points, config.seed)
                 for split, x in (("train", fixed_train), ("valid", whole_valid))}  # fmt: skip
        gap_x = {split: x.to(device) for split, x in gap_x.items()}

    torch.manual_seed(config.seed)
    model, encoder, family = build(config, dataset.data_dim, dataset.image_shape)
    model.to(device)
    encoder.to(device)
    if world.main:  # once the data have loaded and the networks are built
        save_config(config, run_dir / "config.toml")
    run = _VAEEpochs(config, model, encoder, family, route, world, device, train_x, valid_x,
                     dynamic, diagnostics_x, gap_x)  # fmt: skip
    fit_epochs(run, run_dir, checkpoint_format=CHECKPOINT_FORMAT, write=world.main,
               progress=config.progress and world.main, total=config.epochs,
               state=state, tensorboard=config.tensorboard)  # fmt: skip
    model, encoder, best_state = run.model, run.encoder, run.best_state
    epoch, best = run.epoch, run.best
    distributed.assert_in_sync([model, encoder], world)
    if world.size > 1:  # DDP's reducer goes before its process group does, not at exit
        del run
        gc.collect()

    model.load_state_dict(best_state["model"])
    encoder.load_state_dict(best_state["encoder"])
    whole = best  # the best epoch's validation ELBO, on the whole split
    if len(valid_x) < len(whole_valid):
        whole = validation_elbo(model, encoder, family, whole_valid, config, world)
        if world.main:
            log.info("validation ELBO of the best epoch on all %d validation images: %.3f (%.3f "
                     "on the %d scored every epoch)", len(whole_valid), whole, best,
                     len(valid_x))  # fmt: skip
    if world.main:
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "config": to_dict(config),
                "data_dim": dataset.data_dim,
                "image_shape": list(dataset.image_shape or []),
                "model": model.state_dict(),
                "encoder": encoder.state_dict(),
                "best_valid_elbo": best,
                "valid_elbo_whole_split": whole,
                "epochs": epoch,
            },
            run_dir / "model.pt",
        )
    distributed.finish(world)
    return Trained(model, encoder, family, config, dataset.image_shape, run_dir)
