"""fit_local from the prior start, with default settings, on the closed-form battery.

For every model of ``tests/battery.py`` (broad, peaked, very peaked, correlated,
near-prior, mixed scales) this fits the diagonal and the full-covariance family per
datapoint and prints, against the closed forms, the diagonal shortfall
L[q*_diag optimum] - L[q*] and the full-covariance gap log p(x) - L[q*] (both exact,
averaged over the rows, in nats; 0 is perfect), the full-covariance gap when started
from the diagonal q* (as the gap report does), mean steps, converged rows and seconds.

    python benchmarks/battery.py            # one thread, 20 rows per model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from battery import battery, describe, exact_elbo  # noqa: E402

from amortized import DiagonalGaussian, FullCovarianceGaussian, fit_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':13s} {'family':16s} {'error':>9s} {'worst row':>9s} {'steps':>6s} "
          f"{'conv.':>6s} {'seconds':>8s}")  # fmt: skip
    for name, (lg, x) in battery(args.rows).items():
        print(f"# {name}: {describe(lg)}")
        d = lg.latent_dim
        diag, full = DiagonalGaussian(d), FullCovarianceGaussian(d)
        optimum = lg.best_diagonal_elbo(x)
        torch.manual_seed(args.seed)
        rows = []
        start = time.perf_counter()
        fit_d = fit_local(lg.model, diag, x)
        rows.append(("diagonal", optimum - exact_elbo(lg, diag.distribution(fit_d.lam), x),
                     fit_d, time.perf_counter() - start))  # fmt: skip
        start = time.perf_counter()
        fit_f = fit_local(lg.model, full, x)
        rows.append(("fullcov", lg.log_px(x) - exact_elbo(lg, full.distribution(fit_f.lam), x),
                     fit_f, time.perf_counter() - start))  # fmt: skip
        init = full.from_gaussian(*diag.gaussian_moments(fit_d.lam))
        start = time.perf_counter()
        fit_w = fit_local(lg.model, full, x, init)
        error = lg.log_px(x) - exact_elbo(lg, full.distribution(fit_w.lam), x)
        rows.append(("fullcov from q*", error, fit_w, time.perf_counter() - start))
        for family, error, fit, seconds in rows:
            print(f"{name:13s} {family:16s} {float(error.mean()):9.4f} {float(error.max()):9.4f} "
                  f"{float(fit.steps.double().mean()):6.0f} "
                  f"{int(fit.converged.sum()):3d}/{len(x):<2d} {seconds:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
