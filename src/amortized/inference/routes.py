r"""Inference routes: how the rows of lambda are computed, and what learns from them.

A variational family is q(z; lambda) with one parameter row per datapoint. A route is the
rule that computes those rows for a batch of x, and the bounds that train the model and
the encoder on them:

- ``amortized``: lambda = encoder(x); model and encoder learn from the bound there.
- ``savae``: K refinement steps from encoder(x); both learn from the bound at lambda_K,
  the encoder through the steps.
- ``vae+svi``: K steps from a detached encoder(x); the model learns from the bound at
  lambda_K, the encoder from its own bound at encoder(x).
- ``svi``: K steps from the prior; the model learns from the bound at lambda_K; no encoder.
- ``iterative``: T learned updates of lambda; both learn from the bound averaged over
  the iterates.

SA-VAE is Kim et al. (2018); VAE+SVI and SVI are their baselines (Krishnan et al. 2018
and Hoffman et al. 2013); iterative inference is Marino, Yue & Mandt (2018). The loop,
evaluation and the run's files ask the route; nothing branches on its name. A new route
is one subclass of :class:`Route` registered with :func:`register_route`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..families import VariationalFamily
from ..model import LatentVariableModel
from .iterative import IterativeEncoder
from .refine import refine

__all__ = ["Route", "ROUTES", "register_route", "route_for",
           "Amortized", "SemiAmortized", "EncoderThenSVI", "SVI", "Iterative"]  # fmt: skip

#: ``bound(lam) -> (batch,)``: the training bound at lam (ELBO, IWAE, free bits), as the
#: training loop defines it for the current minibatch and KL weight.
Bound = Callable[[Tensor], Tensor]


class Route:
    """How lambda is computed for a batch of x, and the bounds that train on it.

    Class attributes say what the training loop must know: ``has_encoder`` (whether an
    encoder's q exists to diagnose), ``shared_objective`` (whether model and encoder learn
    from one objective, which distributed training needs), ``supports_aggressive``
    (whether He et al.'s encoder-only steps apply).
    """

    name: ClassVar[str]
    has_encoder: ClassVar[bool] = True
    shared_objective: ClassVar[bool] = True
    supports_aggressive: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any) -> Route:
        """The route with the settings a :class:`amortized.config.TrainConfig` gives it."""
        return cls()

    @classmethod
    def check(cls, config: Any) -> list[tuple[bool, str]]:
        """(ok, message) pairs for settings this route cannot work with."""
        return []

    def build_encoder(self, default: Callable[[], nn.Module], model: LatentVariableModel,
                      family: VariationalFamily, data_dim: int) -> nn.Module:  # fmt: skip
        """The route's encoder; ``default()`` builds the one the config describes."""
        return default()

    def lam(self, model: LatentVariableModel, encoder: nn.Module, family: VariationalFamily,
            x: Tensor) -> Tensor:  # fmt: skip
        """lambda for x at evaluation, ``(batch, family.num_params)``, without training graph."""
        raise NotImplementedError

    def bounds(self, model: LatentVariableModel, encoder: nn.Module,
               family: VariationalFamily, x: Tensor, bound: Bound, beta: float
               ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """The bounds, ``(batch,)`` each, whose gradients train the model and the encoder:
        the same tensor twice where they share one objective, None for no encoder."""
        raise NotImplementedError


ROUTES: dict[str, type[Route]] = {}


def register_route(cls: type[Route]) -> type[Route]:
    """Make a route available by its ``name`` (``TrainConfig.inference``, ``--inference``)."""
    ROUTES[cls.name] = cls
    return cls


def route_for(config: Any) -> Route:
    """The route a config's ``inference`` names, with its settings."""
    try:
        return ROUTES[config.inference].from_config(config)
    except KeyError:
        raise ValueError(f"inference must be one of {tuple(ROUTES)}") from None


@register_route
class Amortized(Route):
    """The VAE: lambda = encoder(x), one bound for both (Kingma & Welling 2014)."""

    name = "amortized"
    supports_aggressive = True

    def lam(self, model, encoder, family, x):
        with torch.no_grad():
            return encoder(x)

    def bounds(self, model, encoder, family, x, bound, beta):
        value = bound(encoder(x))
        return value, value


@dataclass
class _Refined(Route):
    """K refinement steps (:func:`amortized.refine`) from a start lambda_0."""

    steps: int = 20
    lr: float = 0.02
    method: str = "adam"

    @classmethod
    def from_config(cls, config):
        return cls(steps=config.svi_steps, lr=config.svi_lr, method=config.svi_method)

    def _settings(self) -> dict:
        return {"steps": self.steps, "method": self.method, "lr": self.lr}

    def start(self, encoder: nn.Module, family: VariationalFamily, x: Tensor) -> Tensor:
        """lambda_0: the encoder's output."""
        return encoder(x)

    def lam(self, model, encoder, family, x):
        with torch.no_grad():
            lam0 = self.start(encoder, family, x)
        return refine(model, family, x, lam0, **self._settings())


@register_route
class SemiAmortized(_Refined):
    """SA-VAE (Kim et al. 2018): both learn from the bound at lambda_K, the encoder
    through the K steps (exact second-order autograd)."""

    name = "savae"

    def bounds(self, model, encoder, family, x, bound, beta):
        lam = refine(model, family, x, self.start(encoder, family, x), beta=beta,
                     create_graph=True, **self._settings())  # fmt: skip
        value = bound(lam)
        return value, value


@register_route
class EncoderThenSVI(_Refined):
    """VAE+SVI: the model learns from lambda_K refined from a detached encoder(x); the
    encoder from its own bound at encoder(x)."""

    name = "vae+svi"
    shared_objective = False

    def bounds(self, model, encoder, family, x, bound, beta):
        lam0 = self.start(encoder, family, x)
        lam = refine(model, family, x, lam0, beta=beta, **self._settings())
        return bound(lam), bound(lam0)


@register_route
class SVI(_Refined):
    """Stochastic VI: K steps from the prior, no encoder. (The run still holds the
    config's encoder network, untrained, so that every run's files share one layout.)"""

    name = "svi"
    has_encoder = False
    shared_objective = False

    def start(self, encoder, family, x):
        return family.prior_init(x.shape[0], device=x.device, dtype=x.dtype)

    def bounds(self, model, encoder, family, x, bound, beta):
        lam = refine(model, family, x, self.start(encoder, family, x), beta=beta,
                     **self._settings())  # fmt: skip
        return bound(lam), None


@register_route
@dataclass
class Iterative(Route):
    """Iterative amortized inference (Marino et al. 2018): a learned update network
    (:class:`amortized.IterativeEncoder`) whose T iterates' mean bound trains both."""

    name = "iterative"
    iterations: int = 5
    start: str = "prior"
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"

    @classmethod
    def from_config(cls, config):
        return cls(iterations=config.iterations, start=config.iterative_start,
                   hidden=tuple(config.hidden), activation=config.activation)  # fmt: skip

    @classmethod
    def check(cls, config):
        return [(config.encoder == "mlp",
                 "iterative inference has its own encoder: encoder must be mlp")]  # fmt: skip

    def build_encoder(self, default, model, family, data_dim):
        return IterativeEncoder(model, family, data_dim, iterations=self.iterations,
                                hidden=self.hidden, activation=self.activation,
                                start=self.start)  # fmt: skip

    def lam(self, model, encoder, family, x):
        with torch.no_grad():
            return encoder(x)

    def bounds(self, model, encoder, family, x, bound, beta):
        value = torch.stack([bound(lam) for lam in encoder.trajectory(x)]).mean(0)
        return value, value
