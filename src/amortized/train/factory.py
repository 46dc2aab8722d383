"""What a TrainConfig builds: its checks, and the model, encoder and family it describes.

Every choice a setting allows is checked here once, with one line naming the field
(:func:`validate`); :func:`build` makes the networks, asking the config's route
(:mod:`amortized.inference.routes`) for its encoder.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..config import ConfigError, TrainConfig, check_fields, choices
from ..families import FAMILIES, InverseAutoregressiveFlow, PlanarFlow, VariationalFamily
from ..inference.routes import ROUTES, route_for
from ..memory import free_memory, gib
from ..model import LatentVariableModel
from ..nets.autoregressive import MADEDecoder, WithoutLatent
from ..nets.conv import ConvDecoder, ConvEncoder
from ..nets.decoders import DECODERS
from ..nets.encoders import MLPEncoder
from ..nets.layers import ACTIVATIONS
from ..nets.pixelcnn import GatedPixelCNNDecoder

__all__ = ["validate", "build", "parse_device", "OBJECTIVES", "LR_SCHEDULES", "KL_SCHEDULES",
           "FREE_BITS_MODES", "DECODER_KINDS", "ENCODER_KINDS", "AUTOREGRESSIVE",
           "CLOSED_FORM_KL"]  # fmt: skip

OBJECTIVES = choices(TrainConfig, "objective")


def parse_device(device: str) -> str:
    """``device`` if it names a device this machine has (cpu, cuda, cuda:1, mps), else a
    ConfigError saying what is wrong: a name torch does not know, or a GPU not here."""
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise ConfigError(f"device {device}: no CUDA GPU is available here (torch "
                              f"{torch.__version__}, {build}); use --device cpu")  # fmt: skip
        if where.index is not None and where.index >= count:
            raise ConfigError(f"device {device}: there is no such GPU here ({count} found, "
                              f"cuda:0 to cuda:{count - 1})")  # fmt: skip
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device}: MPS is not available here; use --device cpu")
    elif where.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def validate(config: TrainConfig) -> None:
    """Reject settings that cannot work, with one line naming the field."""
    check_fields(config)  # every setting's choices and bounds, declared beside it (config.py)
    parse_device(config.device)
    checks = [
        (
            config.decoder in ("mlp", "conv") or config.likelihood == "bernoulli",
            f"the {config.decoder} decoder models binary data: likelihood must be bernoulli",
        ),
        (
            config.decoder_uses_z or config.decoder in AUTOREGRESSIVE,
            "decoder_uses_z = false needs an autoregressive decoder (made or pixelcnn)",
        ),
        (len(config.made_hidden) >= 1, "made_hidden needs at least one size"),
        (config.pixelcnn_kernel % 2 == 1, "pixelcnn_kernel must be odd"),
        (len(config.conv_channels) >= 1, "conv_channels needs at least one stage"),
        (config.family in FAMILIES, f"family must be one of {sorted(FAMILIES)}"),
        (config.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}"),
        (config.inference in ROUTES, f"inference must be one of {tuple(ROUTES)}"),
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
    ]
    if config.inference in ROUTES:
        checks += ROUTES[config.inference].check(config)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


LR_SCHEDULES = choices(TrainConfig, "lr_schedule")
DECODER_KINDS = choices(TrainConfig, "decoder")
AUTOREGRESSIVE = ("pixelcnn", "made")
ENCODER_KINDS = choices(TrainConfig, "encoder")
KL_SCHEDULES = choices(TrainConfig, "kl_schedule")
FREE_BITS_MODES = choices(TrainConfig, "free_bits_mode")
#: Families whose KL to the prior (and its per-dimension parts) is exact and differentiable.
CLOSED_FORM_KL = ("diagonal", "fullcov")


def build(
    config: TrainConfig, data_dim: int, image_shape: tuple[int, ...] | None = None
) -> tuple[LatentVariableModel, nn.Module, VariationalFamily]:
    """The model, encoder and family a config describes (freshly initialised).

    ``image_shape`` (height, width) is needed by the image networks (pixelcnn and conv).
    """
    validate(config)
    images = [f"the {config.decoder} decoder"] if config.decoder in ("pixelcnn", "conv") else []
    images += ["the conv encoder"] if config.encoder == "conv" else []
    if images and (
        image_shape is None or len(image_shape) != 2 or math.prod(image_shape) != data_dim
    ):
        raise ConfigError(
            f"{' and '.join(images)} needs images of shape (height, width); this data has "
            f"{data_dim} values per datapoint and image shape {image_shape}"
        )
    check_size(config, data_dim, image_shape)
    try:  # a conv stage count that does not divide the image, ...
        return _networks(config, data_dim, image_shape)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _networks(config: TrainConfig, data_dim: int, image_shape
              ) -> tuple[LatentVariableModel, nn.Module, VariationalFamily]:  # fmt: skip
    flow = config.family in (PlanarFlow.name, InverseAutoregressiveFlow.name)
    options = {"acts_on": config.flow_acts_on} if flow else {}
    family = FAMILIES[config.family](config.latent_dim, **options)
    model = LatentVariableModel(_decoder(config, data_dim, image_shape), config.latent_dim)
    encoder = route_for(config).build_encoder(
        lambda: _encoder(config, data_dim, image_shape, family), model, family, data_dim
    )
    return model, encoder, family


#: Bytes per parameter while training: float32 weights, gradients and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def check_size(config: TrainConfig, data_dim: int, image_shape=None) -> int:
    """The number of parameters the config's networks have, counted on the meta device
    (nothing allocated); a ConfigError if they cannot be built at all or if training them
    would need more memory than the device has free. Returns the count."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            modules = _networks(config, data_dim, image_shape)
        except ValueError:
            return 0  # a shape the real build names in its own message
        except (RuntimeError, OverflowError, MemoryError, TypeError) as err:  # sizes too large
            raise ConfigError(
                "the networks this config describes cannot be built (latent_dim "
                f"{config.latent_dim}, hidden {list(config.hidden)}): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
    count = sum(t.numel() for m in modules if isinstance(m, nn.Module)
                for t in (*m.parameters(), *m.buffers()))  # fmt: skip
    need, free = count * TRAINING_BYTES_PER_PARAMETER, free_memory(config.device)
    if free is not None and need > free:
        raise ConfigError(
            f"the networks have {count:,} parameters, about {gib(need)} to train with their "
            f"gradients and Adam's moments, more than the {gib(free)} free on "
            f"{config.device}: reduce latent_dim, hidden or the decoder's size"
        )
    return count


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
