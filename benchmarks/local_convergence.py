"""How close does fit_local's default stopping rule get to the per-datapoint optimum?

Fits the same test points with the gap report's defaults and with a much more thorough
setting (smaller steps, 8x the samples, a tighter tolerance, more decays), from the
encoder and from the prior, and evaluates every L[q*] with the same 2,000-sample ELBO.
The difference bounds how much the default under-reports L[q*] (and so the
amortization gap).

    python benchmarks/local_convergence.py --run-dir runs/bmnist-ffg --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import time

import torch

from amortized import elbo, fit_local
from amortized.data import load_dataset
from amortized.train import load_run, prepare_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--points", type=int, default=100)
    args = parser.parse_args()

    trained = load_run(args.run_dir)
    model, family = trained.model, trained.family
    for p in model.parameters():
        p.requires_grad_(False)
    dataset = load_dataset(trained.config.dataset, args.data_dir)
    x = prepare_split(dataset, "test", trained.config.likelihood)[: args.points]
    with torch.no_grad():
        lam_q = trained.encoder(x)

    def evaluate(lam):
        torch.manual_seed(5)
        with torch.no_grad():
            return float(elbo(model, family, lam, x, 2000).mean())

    print(f"{args.points} test points of {trained.config.dataset}; L[.] from 2,000 samples")
    print(f"{'route':40s} {'L':>9s} {'mean steps':>10s} {'seconds':>8s}")
    print(f"{'encoder L[q]':40s} {evaluate(lam_q):9.3f}")
    thorough = dict(lr=0.01, samples=64, steps=6000, tol=0.001, max_decays=5)
    for name, init, kwargs in [
        ("default (lr 0.02, 8 samples), from encoder", lam_q, dict(lr=0.02)),
        ("default, from the prior", None, dict(lr=0.02)),
        ("thorough (lr 0.01, 64 samples), encoder", lam_q, thorough),
    ]:
        torch.manual_seed(0)
        start = time.perf_counter()
        fit = fit_local(model, family, x, init, **kwargs)
        seconds = time.perf_counter() - start
        print(f"{name:40s} {evaluate(fit.lam):9.3f} {float(fit.steps.float().mean()):10.0f} "
              f"{seconds:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
