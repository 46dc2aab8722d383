"""Inference routes as objects: the loop, evaluation and validation ask the route.

A toy route registered here, whose q keeps the encoder's means with a fixed scale, is
trained end to end by the unchanged training loop, and evaluated by the same code as the
built-in routes.
"""

from __future__ import annotations

import math

import pytest
import torch

from amortized import DiagonalGaussian, elbo
from amortized.config import ConfigError, TrainConfig
from amortized.data import Dataset, load_dataset
from amortized.inference.routes import ROUTES, Route, register_route, route_for
from amortized.train import evaluate_elbo, read_metrics, train, validate

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(latent_dim=2, hidden=(16,), epochs=2, batch_size=50, diagnostics_points=20,
            progress=False, seed=0)  # fmt: skip
LOG_SCALE = math.log(0.3)


class FixedScale(Route):
    """lambda = [the encoder's means, log 0.3]: a route that learns only where q sits."""

    name = "fixed-scale"
    calls = {"lam": 0, "bounds": 0}

    def _lam(self, encoder, x):
        lam = encoder(x)  # DiagonalGaussian: [means, log-scales]
        mean = lam[:, : lam.shape[1] // 2]
        return torch.cat([mean, torch.full_like(mean, LOG_SCALE)], dim=-1)

    def lam(self, model, encoder, family, x):
        FixedScale.calls["lam"] += 1
        with torch.no_grad():
            return self._lam(encoder, x)

    def bounds(self, model, encoder, family, x, bound, beta):
        FixedScale.calls["bounds"] += 1
        value = bound(self._lam(encoder, x))
        return value, value


@pytest.fixture(scope="module")
def tiny_data():
    full = load_dataset("mnist5k")
    return Dataset("tiny", full.train[:300], full.valid[:100], full.test[:100], "dynamic", (28, 28))


@pytest.fixture
def toy_route():
    register_route(FixedScale)
    yield FixedScale
    del ROUTES[FixedScale.name]


def test_a_registered_route_trains_and_evaluates_through_the_same_loop(toy_route, tmp_path,
                                                                        tiny_data):  # fmt: skip
    config = TrainConfig(**TINY, inference="fixed-scale")
    trained = train(config, tmp_path, dataset=tiny_data)
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and all(math.isfinite(m["valid_elbo"]) for m in metrics)
    assert metrics[1]["valid_elbo"] > metrics[0]["valid_elbo"]  # it learns
    assert toy_route.calls["bounds"] > 0 and toy_route.calls["lam"] > 0
    # evaluation asks the route for lambda: the ELBO of the fixed-scale q
    x = tiny_data.valid[:40].round()
    family = DiagonalGaussian(2)
    torch.manual_seed(5)
    via_route = evaluate_elbo(trained.model, trained.encoder, family, x, 10, config=config)
    torch.manual_seed(5)
    lam = FixedScale()._lam(trained.encoder, x).detach()
    direct = float(elbo(trained.model, family, lam, x, 10).mean())
    assert via_route == pytest.approx(direct, rel=1e-6)
    assert (lam[:, 2:] == LOG_SCALE).all()


def test_validation_names_the_registered_routes(toy_route):
    validate(TrainConfig(**TINY, inference="fixed-scale"))
    with pytest.raises(ConfigError, match="fixed-scale"):
        validate(TrainConfig(**TINY, inference="nope"))
    with pytest.raises(ConfigError, match="aggressive training is for inference amortized$"):
        validate(TrainConfig(**TINY, inference="fixed-scale", aggressive=True))
    with pytest.raises(ValueError, match="inference must be one of"):
        route_for(TrainConfig(**TINY, inference="nope"))


def test_the_built_in_routes_say_what_the_loop_needs():
    shared = {name for name, r in ROUTES.items() if r.shared_objective}
    assert shared == {"amortized", "savae", "iterative"}  # what distributed training runs
    assert {name for name, r in ROUTES.items() if not r.has_encoder} == {"svi"}
    assert {name for name, r in ROUTES.items() if r.supports_aggressive} == {"amortized"}
    config = TrainConfig(**TINY, inference="savae", svi_steps=7, svi_lr=0.05, svi_method="sgd")
    savae = route_for(config)
    assert (savae.steps, savae.lr, savae.method) == (7, 0.05, "sgd")
    with pytest.raises(ConfigError, match="encoder must be mlp"):
        validate(TrainConfig(**TINY, inference="iterative", encoder="conv"))
