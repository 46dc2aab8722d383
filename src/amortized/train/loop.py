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

import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..config import ConfigError, TrainConfig, from_dict, save_config, to_dict
from ..data.core import DataError, Dataset, binarize, check_data, fixed_binarization, load_dataset
from ..data.mapped import MappedRows
from ..estimators import elbo, iwae_bound, kl_to_prior
from ..families import FAMILIES, VariationalFamily
from ..inference.iterative import STARTS as ITERATIVE_STARTS
from ..inference.refine import METHODS
from ..inference.routes import ROUTES, Amortized, route_for
from ..measure.diagnostics import collapse_warning, kl_per_dimension, latent_diagnostics
from ..model import LatentVariableModel
from ..nets.autoregressive import MADEDecoder, WithoutLatent
from ..nets.conv import ConvDecoder, ConvEncoder
from ..nets.decoders import DECODERS
from ..nets.encoders import MLPEncoder
from ..nets.layers import ACTIVATIONS, adam
from ..nets.pixelcnn import GatedPixelCNNDecoder
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .fit import fit_epochs, read_metrics

__all__ = [
    "Trained",
    "build",
    "train",
    "load_run",
    "read_metrics",
    "prepare_split",
    "evaluation_subset",
    "evaluate_elbo",
]

CHECKPOINT_FORMAT = "amortized-train-v1"
OBJECTIVES = ("elbo", "iwae")


@dataclass
class Trained:
    """A trained model with its amortized encoder, family and the config that made it."""

    model: LatentVariableModel
    encoder: nn.Module
    family: VariationalFamily
    config: TrainConfig
    image_shape: tuple[int, ...] | None = None
    run_dir: Path | None = None


def validate(config: TrainConfig) -> None:
    """Reject settings that cannot work, with one line naming the field."""
    checks = [
        (config.likelihood in DECODERS, f"likelihood must be one of {sorted(DECODERS)}"),
        (config.decoder in DECODER_KINDS, f"decoder must be one of {DECODER_KINDS}"),
        (
            config.decoder in ("mlp", "conv") or config.likelihood == "bernoulli",
            f"the {config.decoder} decoder models binary data: likelihood must be bernoulli",
        ),
        (
            config.decoder_uses_z or config.decoder in AUTOREGRESSIVE,
            "decoder_uses_z = false needs an autoregressive decoder (made or pixelcnn)",
        ),
        (
            len(config.made_hidden) >= 1 and all(h >= 1 for h in config.made_hidden),
            "made_hidden needs at least one size, each >= 1",
        ),
        (
            config.pixelcnn_channels >= 1 and config.pixelcnn_layers >= 1,
            "pixelcnn_channels and pixelcnn_layers must be >= 1",
        ),
        (
            config.pixelcnn_kernel >= 3 and config.pixelcnn_kernel % 2 == 1,
            "pixelcnn_kernel must be odd and >= 3",
        ),
        (config.encoder in ENCODER_KINDS, f"encoder must be one of {ENCODER_KINDS}"),
        (
            len(config.conv_channels) >= 1 and all(c >= 1 for c in config.conv_channels),
            "conv_channels needs at least one stage, each >= 1",
        ),
        (config.family in FAMILIES, f"family must be one of {sorted(FAMILIES)}"),
        (config.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}"),
        (config.objective in OBJECTIVES, f"objective must be one of {list(OBJECTIVES)}"),
        (config.latent_dim >= 1, "latent_dim must be >= 1"),
        (all(h >= 1 for h in config.hidden), "hidden sizes must be >= 1"),
        (config.samples >= 1, "samples must be >= 1"),
        (config.epochs >= 0, "epochs must be >= 0"),
        (config.batch_size >= 1, "batch_size must be >= 1"),
        (config.lr > 0 and math.isfinite(config.lr), "lr must be a positive number"),
        (
            config.grad_clip >= 0 and math.isfinite(config.grad_clip),
            "grad_clip must be a number >= 0 (0: no clipping)",
        ),
        (config.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
        (config.inference in ROUTES, f"inference must be one of {tuple(ROUTES)}"),
        (config.svi_steps >= 0, "svi_steps must be >= 0"),
        (config.iterations >= 1, "iterations must be >= 1"),
        (
            config.iterative_start in ITERATIVE_STARTS,
            f"iterative_start must be one of {ITERATIVE_STARTS}",
        ),
        (config.svi_lr > 0 and math.isfinite(config.svi_lr), "svi_lr must be a positive number"),
        (config.svi_method in METHODS, f"svi_method must be one of {METHODS}"),
        (
            config.warmup_epochs >= 0 and math.isfinite(config.warmup_epochs),
            "warmup_epochs must be a number >= 0",
        ),
        (config.kl_schedule in KL_SCHEDULES, f"kl_schedule must be one of {KL_SCHEDULES}"),
        (
            config.free_bits >= 0 and math.isfinite(config.free_bits),
            "free_bits must be a number >= 0",
        ),
        (
            config.free_bits_mode in FREE_BITS_MODES,
            f"free_bits_mode must be one of {FREE_BITS_MODES}",
        ),
        (
            config.free_bits == 0 or config.objective == "elbo",
            "free_bits needs objective elbo (the IWAE bound has no separate KL term)",
        ),
        (
            config.free_bits == 0 or config.family in CLOSED_FORM_KL,
            f"free_bits needs a family with a closed-form KL: {CLOSED_FORM_KL}",
        ),
        (
            config.diagnostics_points == 0 or config.diagnostics_points >= 2,
            "diagnostics_points must be 0 (off) or >= 2",
        ),
        (
            not config.aggressive or config.inference not in ROUTES
            or ROUTES[config.inference].supports_aggressive,
            "aggressive training is for inference "
            + ", ".join(name for name, r in ROUTES.items() if r.supports_aggressive),
        ),
        (
            not config.aggressive or config.diagnostics_points >= 2,
            "aggressive training needs diagnostics_points >= 2 (it watches I(x; z))",
        ),
        (config.patience >= 1, "patience must be >= 1"),
        (config.valid_samples >= 1, "valid_samples must be >= 1"),
    ]
    if config.inference in ROUTES:
        checks += ROUTES[config.inference].check(config)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


LR_SCHEDULES = ("constant", "burda", "cosine")
DECODER_KINDS = ("mlp", "conv", "pixelcnn", "made")
AUTOREGRESSIVE = ("pixelcnn", "made")
ENCODER_KINDS = ("mlp", "conv")
KL_SCHEDULES = ("linear", "sigmoid")
FREE_BITS_MODES = ("dimension", "total")
#: Families whose KL to the prior (and its per-dimension parts) is exact and differentiable.
CLOSED_FORM_KL = ("diagonal", "fullcov")


def kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The KL weight beta at (1-based) training ``step``: from 0 to 1 over the warm-up.

    ``linear`` is Bowman et al.'s (2016) ramp; ``sigmoid`` is the logistic curve centred
    half way through the warm-up, 1 / (1 + exp(-10 (t - 1/2))) at fraction t of it.

    Example:
        >>> c = TrainConfig(warmup_epochs=1.0, kl_schedule="sigmoid")
        >>> [round(kl_weight(c, s, 100), 3) for s in (1, 50, 99, 100)]
        [0.007, 0.5, 0.993, 1.0]
    """
    warm = config.warmup_epochs * steps_per_epoch
    if warm <= 0 or step >= warm:
        return 1.0
    t = step / warm
    if config.kl_schedule == "linear":
        return t
    return 1.0 / (1.0 + math.exp(-10.0 * (t - 0.5)))


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch`` under ``config.lr_schedule``.

    ``burda`` is the schedule of Burda, Grosse & Salakhutdinov (2016): stage i lasts 3^i
    epochs at ``lr * 10^(-i/7)``; stages 0..7 make their 3280 epochs. ``cosine`` falls from
    ``lr`` at the first epoch along half a cosine, towards 0 after the last.

    Example:
        >>> c = TrainConfig(lr_schedule="burda")
        >>> [round(learning_rate(c, e) / c.lr, 3) for e in (0, 1, 3, 4, 12, 13)]
        [1.0, 0.72, 0.72, 0.518, 0.518, 0.373]
        >>> c = TrainConfig(lr_schedule="cosine", epochs=4)
        >>> [round(learning_rate(c, e) / c.lr, 3) for e in range(4)]
        [1.0, 0.854, 0.5, 0.146]
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "cosine":
        return config.lr * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return config.lr * 10 ** (-stage / 7)


def build(
    config: TrainConfig, data_dim: int, image_shape: tuple[int, ...] | None = None
) -> tuple[LatentVariableModel, nn.Module, VariationalFamily]:
    """The model, encoder and family a config describes (freshly initialised).

    ``image_shape`` (height, width) is needed by the image networks (pixelcnn and conv).
    """
    validate(config)
    family = FAMILIES[config.family](config.latent_dim)
    images = [f"the {config.decoder} decoder"] if config.decoder in ("pixelcnn", "conv") else []
    images += ["the conv encoder"] if config.encoder == "conv" else []
    if images and (
        image_shape is None or len(image_shape) != 2 or math.prod(image_shape) != data_dim
    ):
        raise ConfigError(
            f"{' and '.join(images)} needs images of shape (height, width); this data has "
            f"{data_dim} values per datapoint and image shape {image_shape}"
        )
    try:  # a conv stage count that does not divide the image, ...
        model = LatentVariableModel(_decoder(config, data_dim, image_shape), config.latent_dim)
        encoder = route_for(config).build_encoder(
            lambda: _encoder(config, data_dim, image_shape, family), model, family, data_dim
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model, encoder, family


def _decoder(config: TrainConfig, data_dim: int, image_shape) -> nn.Module:
    if config.decoder in AUTOREGRESSIVE and not config.decoder_uses_z:
        return WithoutLatent(_decoder(replace(config, decoder_uses_z=True), data_dim, image_shape))
    if config.decoder == "pixelcnn":
        return GatedPixelCNNDecoder(
            config.latent_dim, image_shape, channels=config.pixelcnn_channels,
            layers=config.pixelcnn_layers, kernel=config.pixelcnn_kernel,
        )  # fmt: skip
    if config.decoder == "made":
        return MADEDecoder(
            config.latent_dim, data_dim, hidden=config.made_hidden, activation=config.activation
        )
    if config.decoder == "conv":
        return ConvDecoder(
            config.latent_dim, image_shape, channels=config.conv_channels,
            likelihood=config.likelihood, activation=config.activation,
        )  # fmt: skip
    return DECODERS[config.likelihood](
        config.latent_dim, data_dim, hidden=config.hidden, activation=config.activation
    )


def _encoder(config: TrainConfig, data_dim: int, image_shape, family) -> nn.Module:
    if config.encoder == "conv":
        return ConvEncoder(
            image_shape, family, channels=config.conv_channels, hidden=config.hidden[-1:],
            activation=config.activation,
        )  # fmt: skip
    return MLPEncoder(data_dim, family, hidden=config.hidden, activation=config.activation)


def prepare_split(dataset: Dataset, split: str, likelihood: str, seed: int = 0) -> Tensor:
    """An evaluation split ready for the likelihood: fixed binarization where needed."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    x = getattr(dataset, split)
    if isinstance(x, MappedRows):  # checked chunk by chunk when the directory was opened
        if likelihood == "bernoulli" and dataset.binarization == "none":
            raise DataError(
                f"{dataset.name}/{split}: values outside [0, 1]; a Bernoulli likelihood needs "
                "binary data or grey levels in [0, 1]"
            )
        if likelihood == "bernoulli" and dataset.binarization == "dynamic":
            return x.binarized(seed=1000 * seed)
        return x
    if likelihood == "bernoulli" and dataset.binarization == "dynamic":
        offset = {"train": 0, "valid": 1, "test": 2}[split]
        x = fixed_binarization(x, seed=1000 * seed + offset)
    return check_data(x, likelihood=likelihood, name=f"{dataset.name}/{split}")


def evaluation_subset(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """A fixed random subset of n rows (all rows if n is 0 or >= len(x)), in data order.

    Not the first n rows: splits can be sorted (binarized MNIST's test split is ordered
    by digit), and the first rows would then be a biased sample.
    """
    if n <= 0 or n >= x.shape[0]:
        return x
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=g)[:n].sort().values
    return x[rows]


#: How q is computed in training: ``TrainConfig.inference``.


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
) -> tuple[Tensor, Tensor | None]:
    """The bounds, ``(batch,)`` each, whose gradients train the model and the encoder, as
    the config's route (:mod:`amortized.inference.routes`) makes them from the config's objective.

    The same tensor is returned twice where model and encoder share the objective.
    """

    def bound(lam: Tensor) -> Tensor:
        return _objective(config, model, family, lam, x, beta)

    return route_for(config).bounds(model, encoder, family, x, bound, beta)


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


class _Bounds(nn.Module):
    """:func:`training_bounds` as a module over the model and the encoder, so that
    DistributedDataParallel can wrap it and average their gradients."""

    def __init__(self, config: TrainConfig, model, encoder, family):
        super().__init__()
        self.config, self.model, self.encoder, self.family = config, model, encoder, family

    def forward(self, x: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
        return training_bounds(self.config, self.model, self.encoder, self.family, x, beta)


def _validation_elbo(model, encoder, family, x: Tensor, config: TrainConfig, world) -> float:
    """Mean validation ELBO; with several processes each scores its share and they add up."""
    if world.size == 1:
        return evaluate_elbo(model, encoder, family, x, config.valid_samples, config=config)
    share = x[world.rank :: world.size]
    local = evaluate_elbo(model, encoder, family, share, config.valid_samples, config=config)
    return distributed.all_sum(local * share.shape[0], world) / x.shape[0]


def _latent_record(model, encoder, family, x: Tensor, epoch: int, warn: bool = True) -> dict:
    """KL, KL per dimension, active units and I(x; z) of the encoder's q on x; warns on
    collapse (:func:`amortized.measure.diagnostics.collapse_warning`) when ``warn``."""
    with torch.no_grad():
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
    they are and ``max_norm > 0``, scales them down to at most that total norm."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norm = torch.nn.utils.get_total_norm(grads)
    if not bool(norm.isfinite()):
        return False
    if max_norm > 0:
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


def _completed(config: dict) -> dict:
    """A saved config with the fields added since it was written set to their defaults."""
    return to_dict(from_dict(TrainConfig, config))


def _identity(config: dict) -> dict:
    """The settings that define a run's result (not where it runs, where its files are
    read from, or how verbosely)."""
    return {k: v for k, v in config.items() if k not in ("device", "data_dir", "progress")}


class _VAEEpochs:
    """The VAE's epochs for :func:`amortized.train.fit.fit_epochs`: minibatch steps on the
    route's bounds, validation, early stopping, and the state that resumes them."""

    def __init__(self, config: TrainConfig, model, encoder, family, route, world, device,
                 train_x: Tensor, valid_x: Tensor, dynamic: bool, diagnostics_x):  # fmt: skip
        self.config, self.model, self.encoder, self.family = config, model, encoder, family
        self.route, self.world, self.device = route, world, device
        self.train_x, self.valid_x, self.dynamic = train_x, valid_x, dynamic
        self.diagnostics_x = diagnostics_x  # where the latent code's use is checked
        self.optimizer = adam([*model.parameters(), *encoder.parameters()], config.lr)
        self.bounds: nn.Module = _Bounds(config, model, encoder, family)
        if world.size > 1:  # averages the gradients of every backward pass across processes
            ids = [device.index] if device.type == "cuda" else None
            self.bounds = DistributedDataParallel(self.bounds, device_ids=ids)
        self.order_rng = torch.Generator().manual_seed(config.seed)
        self.binarize_rng = torch.Generator(device).manual_seed(config.seed + 1)
        self.steps_per_epoch = math.ceil(train_x.shape[0] / config.batch_size)
        self.epoch, self.step, self.best, self.bad_epochs = 0, 0, -math.inf, 0
        self.aggressive, self.last_mi = config.aggressive, -math.inf  # He et al.'s switch
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
        total_loss, seen, skipped, encoder_steps = 0.0, 0, 0, 0
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
            loss = self._step(xb, beta)
            if loss is None:
                skipped += 1
                continue
            total_loss += loss * xb.shape[0]
            seen += xb.shape[0]
        model.eval()
        encoder.eval()
        valid = _validation_elbo(model, encoder, self.family, self.valid_x, config, world)
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
            # a decoder cut off from z collapses the code by design: logged, not warned of
            record.update(_latent_record(model, encoder, self.family, self.diagnostics_x,
                                         self.epoch, warn=config.decoder_uses_z))  # fmt: skip
        if config.aggressive:
            record.update(aggressive=self.aggressive, encoder_steps=encoder_steps)
            if self.aggressive and record["mutual_information"] <= self.last_mi:
                self.aggressive = False  # I(x; z) stopped rising: a plain VAE from here
            self.last_mi = record["mutual_information"]
        return record

    def _step(self, xb: Tensor, beta: float) -> float | None:
        """One optimiser step on the route's bounds; the loss, or None where it or its
        gradient is not finite and the step is skipped (on every process alike)."""
        world, optimizer, model, encoder = self.world, self.optimizer, self.model, self.encoder
        model_bound, encoder_bound = self.bounds(xb, beta)
        if self.aggressive:  # the encoder has had its steps: this one is the decoder's
            encoder_bound = None
        loss = -model_bound.mean()
        encoder_loss = None if encoder_bound is None else -encoder_bound.mean()
        finite = bool(torch.isfinite(loss)) and (
            encoder_loss is None or bool(encoder_loss.isfinite())
        )
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
        return float(loss.detach())


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
    ckpt_path = run_dir / "checkpoint.pt"
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None and _identity(_completed(state["config"])) != _identity(to_dict(config)):
        raise ConfigError(
            f"{run_dir} holds a run with a different config; resume it with the same settings "
            "or choose another --run-dir"
        )
    if world.main:
        save_config(config, run_dir / "config.toml")

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA GPU is available")
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dataset = dataset or load_dataset(config.dataset, config.data_dir or None)
    dynamic = config.likelihood == "bernoulli" and dataset.binarization == "dynamic"
    train_x = dataset.train if dynamic else prepare_split(dataset, "train", config.likelihood)
    train_x = train_x.to(device)
    valid_x = prepare_split(dataset, "valid", config.likelihood, config.seed).to(device)
    diagnostics_x = None  # where the latent code's use is checked every epoch
    if config.diagnostics_points and route.has_encoder:
        diagnostics_x = evaluation_subset(valid_x, config.diagnostics_points, config.seed)

    torch.manual_seed(config.seed)
    model, encoder, family = build(config, dataset.data_dim, dataset.image_shape)
    model.to(device)
    encoder.to(device)
    run = _VAEEpochs(config, model, encoder, family, route, world, device, train_x, valid_x,
                     dynamic, diagnostics_x)  # fmt: skip
    fit_epochs(run, run_dir, checkpoint_format=CHECKPOINT_FORMAT, write=world.main,
               progress=config.progress and world.main, total=config.epochs)  # fmt: skip
    model, encoder, best_state = run.model, run.encoder, run.best_state
    epoch, best = run.epoch, run.best
    distributed.assert_in_sync([model, encoder], world)

    model.load_state_dict(best_state["model"])
    encoder.load_state_dict(best_state["encoder"])
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
                "epochs": epoch,
            },
            run_dir / "model.pt",
        )
    distributed.finish(world)
    return Trained(model, encoder, family, config, dataset.image_shape, run_dir)


def load_run(run_dir: str | Path, device: str = "cpu") -> Trained:
    """Load the trained model of a finished run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not path.exists():
        hint = " (training has not finished: resume it with `amortized train`)"
        raise CheckpointError(
            f"no trained model in {run_dir}"
            + (hint if (run_dir / "checkpoint.pt").exists() else "")
        )
    state = load_checkpoint(path, map_location=device)
    config = from_dict(TrainConfig, state["config"])
    image_shape = tuple(state["image_shape"]) or None
    model, encoder, family = build(config, state["data_dim"], image_shape)
    try:
        model.load_state_dict(state["model"])
        encoder.load_state_dict(state["encoder"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match its config: {err}") from None
    model.to(device).eval()
    encoder.to(device).eval()
    return Trained(model, encoder, family, config, image_shape, run_dir)
