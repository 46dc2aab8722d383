"""A finished run: the trained model, encoder and family, loaded back from its directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import TrainConfig, from_dict, to_dict
from ..families import VariationalFamily
from ..model import LatentVariableModel
from .checkpoint import CheckpointError, load_checkpoint
from .factory import build
from .fit import read_metrics

__all__ = ["Trained", "load_run", "read_metrics"]


@dataclass
class Trained:
    """A trained model with its amortized encoder, family and the config that made it."""

    model: LatentVariableModel
    encoder: nn.Module
    family: VariationalFamily
    config: TrainConfig
    image_shape: tuple[int, ...] | None = None
    run_dir: Path | None = None


#: Fields added since runs were first saved whose default is not what those runs did:
#: a saved config without them gets the value that reproduces it.
_BEFORE_THEM = {"valid_points": 0}  # the whole validation split, every epoch


def _completed(config: dict) -> dict:
    """A saved config with the fields added since it was written set to what it ran with:
    their defaults, or (:data:`_BEFORE_THEM`) the behaviour from before they existed."""
    return to_dict(from_dict(TrainConfig, {**_BEFORE_THEM, **config}))


def _identity(config: dict) -> dict:
    """The settings that define a run's result (not where it runs, where its files are
    read from, or how verbosely)."""
    # where or how it runs, and what it measures on the side, not what it trains
    shown = ("device", "data_dir", "progress", "tensorboard", "gap_every", "gap_points")
    return {k: v for k, v in config.items() if k not in shown}


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
    config = from_dict(TrainConfig, _completed(state["config"]))
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
