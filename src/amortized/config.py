"""Typed configurations: plain dataclasses, saved as TOML beside every run.

Every field has a type and a help string; the command line is generated from these
classes (``--field-name value``), and values are checked against the field types, so a
typo or a bad value fails with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w

from .files import write_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "TrainConfig",
    "GapConfig",
    "StudyConfig",
    "GeneralizationConfig",
    "CollapseConfig",
    "ConfigError",
    "check_choices",
    "check_fields",
    "choices",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration value or file is malformed."""


# The choices of every setting that has a fixed few, declared once: the fields below are
# typed with them, values are checked against them where they are read (coerce) and
# where a config is validated (check_choices), and the rest of the code asks
# choices(cls, name). Settings whose choices are registries that can grow (families,
# activations, inference routes) are checked against those registries instead.
Likelihood = Literal["bernoulli", "gaussian"]
EncoderKind = Literal["mlp", "conv"]
DecoderKind = Literal["mlp", "conv", "pixelcnn", "made"]
CollapseDecoder = Literal["made", "pixelcnn"]
Objective = Literal["elbo", "iwae"]
IterativeStart = Literal["prior", "encoder"]
RefineMethod = Literal["adam", "sgd"]
LrSchedule = Literal["constant", "burda", "cosine"]
KlSchedule = Literal["linear", "sigmoid"]
FreeBitsMode = Literal["dimension", "total"]
FlowActsOn = Literal["noise", "latent"]
LocalInit = Literal["encoder", "prior"]
Split = Literal["train", "valid", "test"]


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass
class TrainConfig:
    """How to train a VAE: model, objective, optimiser, schedule, data."""

    dataset: str = field(
        default="mnist5k",
        metadata=_help(
            "mnist5k, binarized-mnist, mnist, fashion-mnist, fashion-mnist-dynamic, or a path "
            "to a .npy/.npz file or a directory of .npy splits"
        ),
    )
    data_dir: str = field(default="", metadata=_help("directory with dataset files"))
    likelihood: Likelihood = field(default="bernoulli", metadata=_help("bernoulli or gaussian"))
    latent_dim: int = field(default=50, metadata=_help("dimension of z", ge=1))
    hidden: tuple[int, ...] = field(
        default=(200, 200), metadata=_help("hidden layer sizes, e.g. 200,200", ge=1)
    )
    encoder: EncoderKind = field(
        default="mlp", metadata=_help("mlp, or conv: stride-2 convolutions over images")
    )
    decoder: DecoderKind = field(
        default="mlp",
        metadata=_help(
            "mlp; conv (transposed convolutions, images); or autoregressive over the pixels "
            "of binary images: pixelcnn (gated PixelCNN) or made (masked MLP)"
        ),
    )
    conv_channels: tuple[int, ...] = field(
        default=(32, 64), metadata=_help("channels of the conv encoder/decoder's stages", ge=1)
    )
    made_hidden: tuple[int, ...] = field(
        default=(500,), metadata=_help("hidden layer sizes of the made decoder", ge=1)
    )
    decoder_uses_z: bool = field(
        default=True,
        metadata=_help(
            "false: the made or pixelcnn decoder ignores z, the fully collapsed model that "
            "shows what the latent code buys"
        ),
    )
    pixelcnn_channels: int = field(default=32, metadata=_help("channels of the PixelCNN", ge=1))
    pixelcnn_layers: int = field(default=5, metadata=_help("gated layers of the PixelCNN", ge=1))
    pixelcnn_kernel: int = field(default=5, metadata=_help("kernel width of the PixelCNN", ge=3))
    activation: str = field(default="tanh", metadata=_help("tanh, relu, elu or softplus"))
    family: str = field(default="diagonal", metadata=_help("diagonal, fullcov, planar or iaf"))
    flow_acts_on: FlowActsOn = field(
        default="latent",
        metadata=_help("where the planar or iaf encoder family's maps act: latent (on z; "
                       "trains the better planar VAE) or noise (on the base Gaussian's "
                       "standard noise, the frame of the flows' per-datapoint q*)"),
    )  # fmt: skip
    objective: Objective = field(default="elbo", metadata=_help("elbo or iwae"))
    samples: int = field(default=1, metadata=_help("samples per datapoint (k of IWAE-k)", ge=1))
    inference: str = field(
        default="amortized",
        metadata=_help(
            "amortized (the VAE); savae: the encoder's output refined by svi_steps steps, "
            "trained end to end through them (Kim et al. 2018); vae+svi: the same steps, "
            "the encoder trained on its own bound; svi: the steps from the prior, no encoder; "
            "iterative: a learned update network (Marino et al. 2018)"
        ),
    )
    iterations: int = field(default=5, metadata=_help("updates of iterative inference", ge=1))
    iterative_start: IterativeStart = field(
        default="prior", metadata=_help("lambda_0 of iterative inference: prior or encoder")
    )
    svi_steps: int = field(
        default=20, metadata=_help("refinement steps of savae/vae+svi/svi", ge=0)
    )
    svi_lr: float = field(default=0.02, metadata=_help("step size of those refinement steps", gt=0))
    svi_method: RefineMethod = field(
        default="adam", metadata=_help("adam, or sgd (momentum 0.5, as in Kim et al. 2018)")
    )
    epochs: int = field(default=100, metadata=_help("maximum training epochs", ge=0))
    batch_size: int = field(default=100, metadata=_help("minibatch size", ge=1))
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate", gt=0))
    grad_clip: float = field(
        default=0.0,
        metadata=_help(
            "clip each step's gradient to this total norm (0: no clipping)",
            ge=0,
            why="0: no clipping",
        ),
    )
    lr_schedule: LrSchedule = field(
        default="constant",
        metadata=_help(
            "constant; burda: stage i of 3^i epochs at lr * 10^(-i/7) (Burda et al. 2016); "
            "cosine: epoch e at lr * (1 + cos(pi e / epochs)) / 2"
        ),
    )
    warmup_epochs: float = field(
        default=10.0, metadata=_help("epochs over which the KL weight rises from 0 to 1", ge=0)
    )
    kl_schedule: KlSchedule = field(
        default="linear", metadata=_help("shape of that rise: linear or sigmoid")
    )
    free_bits: float = field(
        default=0.0,
        metadata=_help(
            "free bits (Kingma et al. 2016): a KL floor in nats per minibatch; 0: off",
            ge=0,
            why="0: off",
        ),
    )
    free_bits_mode: FreeBitsMode = field(
        default="dimension",
        metadata=_help("dimension (a floor on each latent dimension's KL) or total"),
    )
    aggressive: bool = field(
        default=False,
        metadata=_help(
            "aggressive encoder training (He et al. 2019): encoder-only steps before each "
            "decoder step until the encoder's loss stops falling, switched off once I(x; z) "
            "stops rising"
        ),
    )
    diagnostics_points: int = field(
        default=1000,
        metadata=_help(
            "validation points for the per-epoch KL, active units and I(x; z)", ge=0, why="0: off"
        ),
    )
    patience: int = field(
        default=20, metadata=_help("stop after this many epochs without validation gain", ge=1)
    )
    gap_every: int = field(
        default=0,
        metadata=_help("every N epochs, measure the approximation and amortization gaps on "
                       "fixed training and validation subsets (0: never)", ge=0),  # fmt: skip
    )
    gap_points: int = field(
        default=100, metadata=_help("datapoints of each of those subsets", ge=2)
    )
    valid_points: int = field(
        default=1000,
        metadata=_help("validation images scored every epoch, a fixed random subset, for "
                       "choosing the best epoch and early stopping; the whole split is scored "
                       "once, at the end", ge=0, why="0: the whole split every epoch"),  # fmt: skip
    )
    valid_samples: int = field(default=10, metadata=_help("samples of the validation ELBO", ge=1))
    seed: int = field(default=0, metadata=_help("random seed; the same seed gives the same run"))
    device: str = field(default="cpu", metadata=_help("cpu, cuda, cuda:1, ..."))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    tensorboard: bool = field(
        default=False,
        metadata=_help("also write every epoch's scalars to RUN_DIR/tensorboard for "
                       "TensorBoard (needs the tensorboard package)"),  # fmt: skip
    )


@dataclass
class GapConfig:
    """How to measure the inference gaps of a trained model."""

    iwae_k: int = field(
        default=5000,
        metadata=_help("IWAE samples for log p(x)", ge=2, why="its error needs two draws"),
    )
    ais_steps: int = field(
        default=0,
        metadata=_help(
            "if > 0, also estimate log p(x) by AIS with this many steps", ge=0, why="0: no AIS"
        ),
    )
    ais_chains: int = field(default=16, metadata=_help("AIS chains per datapoint", ge=1))
    elbo_samples: int = field(
        default=1000,
        metadata=_help("samples per ELBO evaluation", ge=2, why="its error needs two draws"),
    )
    local_steps: int = field(default=2000, metadata=_help("max steps of per-datapoint VI", ge=0))
    local_lr: float = field(
        default=0.02, metadata=_help("Adam step size of per-datapoint VI", gt=0)
    )
    local_samples: int = field(
        default=8, metadata=_help("samples per per-datapoint gradient", ge=1)
    )
    local_init: LocalInit = field(default="encoder", metadata=_help("encoder or prior"))
    families: tuple[str, ...] = field(
        default=(), metadata=_help("extra families optimised per datapoint, e.g. fullcov")
    )
    refine_steps: tuple[int, ...] = field(
        default=(),
        metadata=_help("refinement curve: L[q] after K steps from the encoder, e.g. 0,5,20", ge=0),
    )
    refine_lr: float = field(default=0.02, metadata=_help("step size of the refinement", gt=0))
    refine_method: RefineMethod = field(
        default="adam", metadata=_help("adam, or sgd (momentum 0.5, as in Kim et al. 2018)")
    )
    split: Split = field(default="test", metadata=_help("train, valid or test"))
    max_points: int = field(
        default=0,
        metadata=_help("evaluate a fixed random subset of N points (0: all)", ge=0, why="0: all"),
    )
    eval_batch_size: int = field(default=500, metadata=_help("datapoints evaluated together", ge=1))
    eval_seed: int = field(default=0, metadata=_help("random seed of the estimates"))


@dataclass
class StudyConfig:
    """A whole study: train, measure the gaps on train and test, write a report."""

    train: TrainConfig = field(default_factory=TrainConfig)
    gap: GapConfig = field(
        default_factory=lambda: GapConfig(
            iwae_k=1000, local_steps=1000, max_points=0, refine_steps=(0, 1, 2, 5, 10, 20, 50, 100)
        )
    )
    train_subset: int = field(
        default=500, metadata=_help("training points on which the gaps are also measured", ge=0)
    )


def _generalization_training() -> TrainConfig:
    """The generalization study's training settings where they differ from a VAE's."""
    return TrainConfig(dataset="binarized-mnist", epochs=100, patience=100, gap_every=10,
                       progress=False)  # fmt: skip


@dataclass
class GeneralizationConfig:
    """How amortized inference generalizes: the gaps over training, a model scored on
    another dataset, and a larger encoder on the same decoder.

    Two VAEs are trained with ``train``, one on ``train.dataset``, one on
    ``shift_dataset``; each is measured (``gap``) on both test sets. On the first model's
    decoder, held fixed, an encoder of the standard size (``train.hidden``) and one of
    ``capacity_hidden`` are each trained afresh for ``capacity_epochs``.
    """

    train: TrainConfig = field(default_factory=_generalization_training)
    gap: GapConfig = field(
        default_factory=lambda: GapConfig(iwae_k=1000, local_steps=1000, max_points=1000,
                                          refine_steps=(0, 1, 2, 5, 10, 20, 50, 100))  # fmt: skip
    )
    shift_dataset: str = field(
        default="fashion-mnist",
        metadata=_help("the second dataset: each model is also scored on the other's test images"),
    )
    capacity_hidden: tuple[int, ...] = field(
        default=(500, 500, 500),
        metadata=_help("hidden sizes of the larger encoder (Cremer et al.'s 784-500-500-500)",
                       ge=1),  # fmt: skip
    )
    capacity_epochs: int = field(
        default=0,
        metadata=_help("epochs of each encoder trained on the fixed decoder", ge=0,
                       why="0: train.epochs"),  # fmt: skip
    )


REMEDY_NAMES = ("plain", "kl-annealing", "free-bits", "aggressive", "savae", "decoder-alone")
#: The training settings each remedy of the collapse study sets for its own row (and
#: patience, which is every row's epochs): a collapse config leaves them at their defaults.
REMEDY_FIELDS = ("warmup_epochs", "kl_schedule", "free_bits", "free_bits_mode", "aggressive",
                 "inference", "svi_steps", "svi_method", "svi_lr", "decoder_uses_z",
                 "patience")  # fmt: skip


def _collapse_training() -> TrainConfig:
    """The collapse study's shared training settings where they differ from a VAE's."""
    return TrainConfig(dataset="binarized-mnist", decoder="made", latent_dim=32, epochs=40,
                       lr=7e-3, lr_schedule="cosine", pixelcnn_channels=8, pixelcnn_layers=8,
                       valid_samples=1, progress=False)  # fmt: skip


@dataclass
class CollapseConfig:
    """The posterior-collapse study: an autoregressive-decoder VAE trained plain and with
    each remedy, the decoder alone, and a VQ-VAE, on the same data.

    ``train`` holds what every row shares (data, decoder, latent size, optimiser,
    ``epochs`` of every VAE but SA-VAE, seed, device); each remedy sets its own
    :data:`REMEDY_FIELDS` on top of it.
    """

    train: TrainConfig = field(default_factory=_collapse_training)
    remedies: tuple[str, ...] = field(
        default=REMEDY_NAMES, metadata=_help(f"the VAEs to train, from {','.join(REMEDY_NAMES)}")
    )
    savae_epochs: int = field(
        default=10, metadata=_help("epochs of SA-VAE (a step costs about 15 plain steps)", ge=1)
    )
    train_points: int = field(default=0, metadata=_help("training subset (0: all)", ge=0))
    valid_points: int = field(default=1000, metadata=_help("validation subset (0: all)", ge=0))
    test_points: int = field(
        default=500, metadata=_help("random test images scored (0: all)", ge=0)
    )
    iwae_k: int = field(default=100, metadata=_help("samples of the IWAE NLL estimate", ge=1))
    vqvae: bool = field(default=True, metadata=_help("train and score the VQ-VAE"))
    vq_latents: int = field(default=16, metadata=_help("codes per image of the VQ-VAE", ge=1))
    vq_code_dim: int = field(default=16, metadata=_help("dimension of a codebook vector", ge=1))
    vq_codebook: int = field(default=64, metadata=_help("codebook entries", ge=1))
    prior_epochs: int = field(default=20, metadata=_help("epochs of the VQ-VAE's code prior", ge=1))

    @staticmethod
    def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
        """A collapse config written before it held a TrainConfig: its shared training
        settings sat beside the study's own; they move into ``train``."""
        shared = {f.name for f in fields(TrainConfig)} - {f.name for f in fields(CollapseConfig)}
        moved = {k: v for k, v in data.items() if k in shared}
        if not moved:
            return data
        rest = {k: v for k, v in data.items() if k not in shared}
        return {**rest, "train": {**moved, **rest.get("train", {})}}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def resolve_types(cls: type) -> dict[str, Any]:
    """The field types of a config class, resolved once (callers only read them)."""
    return typing.get_type_hints(cls)


def choices(cls: type, name: str) -> tuple:
    """The values field ``name`` of config class ``cls`` may take (its Literal type's)."""
    tp = resolve_types(cls)[name]
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} has no fixed choices")
    return typing.get_args(tp)


def check_choices(config: Any, prefix: str = "") -> None:
    """Raise ConfigError, naming the field, for a value outside its Literal type's choices
    (for configs built in Python, which no reading of a file or command line checked)."""
    for f in fields(config):
        value, tp = getattr(config, f.name), resolve_types(type(config))[f.name]
        if _is_dataclass_type(tp):
            check_choices(value, prefix=f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{prefix}{f.name} must be one of {typing.get_args(tp)}")


def check_fields(config: Any, prefix: str = "") -> None:
    """Raise ConfigError, naming the field, for a value outside its choices (its Literal
    type) or its bounds (declared beside the field, see :func:`_help`); nested configs
    are checked with their path (``gap.iwae_k``)."""
    check_choices(config, prefix)
    for f in fields(config):
        value, name = getattr(config, f.name), f"{prefix}{f.name}"
        if _is_dataclass_type(resolve_types(type(config))[f.name]):
            check_fields(value, prefix=f"{name}.")
            continue
        for item in value if isinstance(value, tuple) else (value,):
            problem = _out_of_bounds(item, f.metadata)
            if problem:
                raise ConfigError(f"{name} must be {problem}, got {value!r}")


def _out_of_bounds(value: Any, bounds: typing.Mapping[str, Any]) -> str | None:
    """What ``value`` must be and is not (``">= 1"``, ``"a positive number"``), or None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    why = f" ({bounds['why']})" if "why" in bounds else ""
    finite = not isinstance(value, float) or math.isfinite(value)
    if "gt" in bounds and not (finite and value > bounds["gt"]):
        return "a positive number" if bounds["gt"] == 0 else f"a number > {bounds['gt']}{why}"
    if "ge" in bounds and not (finite and value >= bounds["ge"]):
        return f"{'a number ' if isinstance(value, float) else ''}>= {bounds['ge']}{why}"
    return None


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from TOML or the command line) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if abs(int(value)) >= 2**63:  # past any size a tensor can have
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is tuple:
            (item_tp, _) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, list | tuple):
                raise ValueError
            return tuple(coerce(v, item_tp, name) for v in value)
        if origin in (typing.Union, types.UnionType):
            return coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)), name)
    except (ValueError, TypeError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported field type {tp}")
    raise ConfigError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a (nested) dict, checking names and types. Settings the
    dict leaves out keep their values in ``base`` (by default ``cls()``): a nested
    config's defaults are its parent's (the study's GapConfig, the collapse study's
    TrainConfig), not its own class's."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a table, got {data!r}")
    data = getattr(cls, "_upgrade", lambda d: d)(data)  # older layouts of a config
    base = cls() if base is None else base
    hints = resolve_types(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(
            f"unknown setting {prefix}{sorted(unknown)[0]!s}; known: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.", getattr(base, name))
        else:
            kwargs[name] = coerce(value, tp, f"{prefix}{name}")
    return dataclasses.replace(base, **kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    def convert(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write the config as TOML, atomically (:func:`amortized.files.write_atomic`)."""
    write_atomic(path, tomli_w.dumps(to_dict(config)))


def load_config(cls: type, path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    return from_dict(cls, data)
