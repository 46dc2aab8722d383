r"""Your own model on the command line: ``amortized gap --model my_pkg.my_module:build``.

The protocol: ``build(data_dim)`` is a function of the data's dimension (values per
datapoint) that returns ``(model, encoder, family)``:

- ``model``: a :class:`amortized.LatentVariableModel`: a decoder mapping z, shape
  ``(..., batch, latent_dim)``, to a ``torch.distributions.Distribution`` over x with batch
  shape ``(..., batch)``, and a prior (N(0, I) by default);
- ``encoder``: an ``nn.Module`` mapping ``x`` of shape ``(batch, data_dim)`` to the rows of
  lambda, ``(batch, family.num_params)``;
- ``family``: a :class:`amortized.VariationalFamily` of the model's latent dimension
  (``DiagonalGaussian(latent_dim)``, a flow, or your own).

The spec is ``module:function`` for an importable module, or ``path/to/file.py:function``;
``pythae:DIR`` loads a VAE that pythae saved in DIR (:func:`amortized.adapters.from_pythae`).
A Pyro model and guide come in through ``build``: ``return from_pyro(vae.model, vae.guide,
data_dim)`` (:func:`amortized.adapters.from_pyro`).
``--weights FILE.pt`` loads trained weights into them: a file holding
``{"model": model.state_dict(), "encoder": encoder.state_dict()}`` (tensors only; it is
read with ``weights_only=True``). Everything that can go wrong in the user's code (an import
error, a missing function, a wrong return value, a decoder that does not fit the data)
is one line naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters import from_pythae, load_pythae
from ..config import ConfigError
from ..families import VariationalFamily
from ..model import LatentVariableModel

__all__ = ["UserModel", "load_user_model"]

#: ``--model pythae:DIR``: a model saved by pythae (``model.save(DIR)``, or its trainer's
#: ``final_model`` folder).
PYTHAE = "pythae:"


@dataclass
class UserModel:
    """What ``build`` returned, checked: the model, its encoder and family."""

    model: LatentVariableModel
    encoder: nn.Module
    family: VariationalFamily

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim


def load_user_model(spec: str, x: Tensor, weights: str | Path | None = None,
                    device: str = "cpu") -> UserModel:  # fmt: skip
    """Import ``spec`` (``module:function`` or ``file.py:function``), call it with the data's
    dimension, check what it returns against ``x`` (a few datapoints), load ``weights``."""
    if spec.startswith(PYTHAE):
        user = _pythae(spec, x, weights)
    else:
        user = _built(spec, x, weights)
    user.model.to(device).eval()
    user.encoder.to(device).eval()
    _fits(spec, user, x[:2].to(device))
    return user


def _pythae(spec: str, x: Tensor, weights) -> UserModel:
    """A pythae model folder (``pythae:DIR``), through :func:`amortized.adapters.from_pythae`."""
    if weights is not None:
        raise ConfigError("--weights: a pythae folder holds its own weights (model.pt)")
    vae = load_pythae(spec[len(PYTHAE):])
    shape = tuple(vae.model_config.input_dim or ())
    if math.prod(shape) != x[0].numel():
        raise ConfigError(f"--model {spec}: the model takes datapoints of shape {shape}, "
                          f"{math.prod(shape)} values; the data have {x[0].numel()}")  # fmt: skip
    return UserModel(*from_pythae(vae))


def _built(spec: str, x: Tensor, weights) -> UserModel:
    """``build(data_dim)`` from the user's module, checked, with ``weights`` loaded."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"--model {spec!r}: expected module:function or file.py:function")
    module = _import(where)
    build = getattr(module, name, None)
    if not callable(build):
        raise ConfigError(f"--model {spec}: {where} has no function {name!r}")
    data_dim = int(x[0].numel())
    try:
        built = build(data_dim)
    except Exception as err:  # the user's code: any error, named in one line
        raise ConfigError(f"--model {spec}: {name}({data_dim}) raised {_said(err)}") from None
    user = _checked(spec, built)
    if weights is not None:
        _load_weights(user, Path(weights))
    return user


def _import(where: str):
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"--model: no such file {path}")
            name = f"amortized_user_{abs(hash(str(path.resolve())))}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # ImportError, SyntaxError, or anything the module raises
        raise ConfigError(f"--model: cannot import {where}: {_said(err)}") from None


def _checked(spec: str, built) -> UserModel:
    if not isinstance(built, tuple | list) or len(built) != 3:
        raise ConfigError(f"--model {spec}: expected (model, encoder, family), got "
                          f"{type(built).__name__}")  # fmt: skip
    model, encoder, family = built
    wrong = [(what, want, got) for what, want, got in (
        ("model", LatentVariableModel, model), ("encoder", nn.Module, encoder),
        ("family", VariationalFamily, family)) if not isinstance(got, want)]  # fmt: skip
    if wrong:
        what, want, got = wrong[0]
        raise ConfigError(f"--model {spec}: the {what} must be a {want.__name__}, got "
                          f"{type(got).__name__}")  # fmt: skip
    if family.latent_dim != model.latent_dim:
        raise ConfigError(f"--model {spec}: the family has latent_dim {family.latent_dim}, "
                          f"the model {model.latent_dim}")  # fmt: skip
    return UserModel(model, encoder, family)


def _load_weights(user: UserModel, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--weights: no such file {path}") from None
    except Exception as err:  # damaged, or pickled objects: not loaded
        raise ConfigError(f"--weights {path}: cannot be read as tensors ({_said(err)})") from None
    if not isinstance(state, dict) or not {"model", "encoder"} <= set(state):
        raise ConfigError(f"--weights {path}: expected a dict with 'model' and 'encoder' "
                          "state dicts")  # fmt: skip
    try:
        user.model.load_state_dict(state["model"])
        user.encoder.load_state_dict(state["encoder"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ConfigError(f"--weights {path} do not fit the model: {_said(err)}") from None


def _fits(spec: str, user: UserModel, x: Tensor) -> None:
    """Run the encoder and the decoder once on a few datapoints: shapes must agree."""
    try:
        with torch.no_grad():
            lam = user.encoder(x)
            expected = (x.shape[0], user.family.num_params)
            if tuple(lam.shape) != expected:
                raise ValueError(f"the encoder gives lambda of shape {tuple(lam.shape)}, the "
                                 f"family needs {expected}")  # fmt: skip
            z = user.family.distribution(lam).sample()
            ll = user.model.log_likelihood(x, z)
            if tuple(ll.shape) != (x.shape[0],):
                raise ValueError(f"log_likelihood gives shape {tuple(ll.shape)} for "
                                 f"{x.shape[0]} datapoints, not ({x.shape[0]},)")  # fmt: skip
    except Exception as err:
        raise ConfigError(f"--model {spec} does not fit the data (x of shape "
                          f"{tuple(x.shape)}): {_said(err)}") from None  # fmt: skip


def _said(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
