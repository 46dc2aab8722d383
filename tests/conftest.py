"""Shared test helpers: the linear-Gaussian closed forms expressed as family parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Make tests/linear_gaussian.py importable as `from linear_gaussian import LinearGaussian`.
sys.path.insert(0, str(Path(__file__).parent))

from amortized import FullCovarianceGaussian  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread, restoring the setting afterwards.

    The tensors here are tiny, so threads only add synchronisation; on a machine busy
    with other work two spinning threads made one fit_local call 30x slower (25 s vs 0.85 s).
    Use as ``pytestmark = pytest.mark.usefixtures("single_thread")`` and request it from
    module-scoped fixtures that compute, so they run after it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """200 / 50 / 40 images of mnist5k as a user's ``.npz``: the tiny data of the
    command-line, fault and study tests."""
    import numpy as np

    from amortized.data import load_dataset

    full = load_dataset("mnist5k")
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, train=full.train[:200].numpy(), valid=full.valid[:50].numpy(),
             test=full.test[:40].numpy())  # fmt: skip
    return path


@pytest.fixture
def best_diagonal_lam():
    """``(lg, x) -> lam``: DiagonalGaussian parameters of the best diagonal q for each row.

    The reverse-KL optimum within the diagonal family on a linear-Gaussian model has the
    exact posterior mean m and variances 1 / Lambda_ii, i.e. ``lam = [m, 0.5 log(1 / Lambda_ii)]``.
    """

    def make(lg, x: torch.Tensor) -> torch.Tensor:
        mean, _ = lg.posterior(x)  # (n, D)
        log_scale = -0.5 * torch.diagonal(lg.precision).log()  # (D,)
        return torch.cat([mean, log_scale.expand_as(mean)], dim=-1)  # (n, 2D)

    return make


@pytest.fixture
def exact_posterior_lam():
    """``(lg, x) -> lam``: FullCovarianceGaussian parameters of the exact posterior N(m, S)."""

    def make(lg, x: torch.Tensor) -> torch.Tensor:
        mean, cov = lg.posterior(x)  # (n, D), (D, D)
        chol = torch.linalg.cholesky(cov).expand(mean.shape[0], -1, -1)  # (n, D, D)
        return FullCovarianceGaussian.params_from(mean, chol)  # (n, D + D(D+1)/2)

    return make


@pytest.fixture
def crash_after_saves(monkeypatch):
    """``(module, n)``: make ``module.save_atomic`` raise KeyboardInterrupt right after its
    n-th completed save (a kill just after a checkpoint); ``monkeypatch.undo()`` restores it."""

    def arm(module, n: int) -> None:
        real, calls = module.save_atomic, {"n": 0}

        def crashing_save(obj, path):
            real(obj, path)
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt

        monkeypatch.setattr(module, "save_atomic", crashing_save)

    return arm
