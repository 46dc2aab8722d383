"""A flow's q* started at the diagonal q*, as the gap report starts it, with defaults.

On every model of ``tests/battery.py`` and the exactly integrable nonlinear model of
``tests/nonlinear.py`` it prints the diagonal q*'s gap log p(x) - L and the flow's q*'s (log
p(x) exact, each L from 4,000 draws per row), the share of the diagonal gap the flow
closes, its worst row, mean steps and seconds. With ``--run-dir`` it also fits both on
the first ``--points`` images of a trained run's split and prints what the flow gains
over the diagonal q* (1,000 draws per row for both, from the same seed).

    python benchmarks/flow_q_star.py                       # one thread, 10 rows per model
    python benchmarks/flow_q_star.py --flow planar
    python benchmarks/flow_q_star.py --run-dir runs/bmnist-ffg --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from battery import battery  # noqa: E402
from nonlinear import NonlinearBernoulli  # noqa: E402

from amortized import DiagonalGaussian, elbo, fit_local  # noqa: E402
from amortized.families import FAMILIES  # noqa: E402


def fit_both(model, x, d: int, seed: int, flow: str):
    """The diagonal q* from the prior, then the flow's from it: (diagonal lam, its fit, s)."""
    diagonal, family = DiagonalGaussian(d), FAMILIES[flow](d)
    torch.manual_seed(seed)
    start = fit_local(model, diagonal, x).lam
    begun = time.perf_counter()
    fit = fit_local(model, family, x, family.from_gaussian(*diagonal.gaussian_moments(start)))
    return start, fit, time.perf_counter() - begun


def scores(model, x, d, start, lam, samples, flow: str):
    """L of the diagonal and the flow's q* under the same seed ``(n,)`` each."""
    out = []
    for family, value in ((DiagonalGaussian(d), start), (FAMILIES[flow](d), lam)):
        torch.manual_seed(1)
        with torch.no_grad():
            out.append(elbo(model, family, value, x, samples))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flow", default="iaf", choices=["iaf", "planar"])
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", help="also fit on the images of this trained run")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--points", type=int, default=40, help="the split's first this many")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {name: (lg.model, x, lg.log_px(x), lg.latent_dim)
             for name, (lg, x) in battery(args.rows).items()}  # fmt: skip
    nonlinear = NonlinearBernoulli()
    x = nonlinear.sample_x(args.rows)
    cases["nonlinear"] = (nonlinear.model, x, nonlinear.log_px(x), 2)
    print(f"{'model':13s} {'diagonal gap':>12s} {'flow gap':>8s} {'closed':>7s} "
          f"{'worst row':>9s} {'steps':>6s} {'seconds':>8s}")  # fmt: skip
    for name, (model, x, log_px, d) in cases.items():
        start, fit, seconds = fit_both(model, x, d, args.seed, args.flow)
        before, after = scores(model, x, d, start, fit.lam, 4000, args.flow)
        gap_d, gap_f = float((log_px - before).mean()), float((log_px - after).mean())
        closed = f"{1 - gap_f / gap_d:7.1%}" if gap_d > 0.1 else f"{'-':>7s}"
        print(f"{name:13s} {gap_d:12.4f} {gap_f:8.4f} {closed} "
              f"{float((log_px - after).max()):9.4f} {float(fit.steps.double().mean()):6.0f} "
              f"{seconds:8.1f}")  # fmt: skip
    if args.run_dir:
        from amortized.data import load_dataset
        from amortized.train import load_run, prepare_split

        run = load_run(args.run_dir)
        data = load_dataset(run.config.dataset, args.data_dir)
        x = prepare_split(data, args.split, run.config.likelihood)[: args.points]
        d = run.config.latent_dim
        start, fit, seconds = fit_both(run.model, x, d, args.seed, args.flow)
        before, after = scores(run.model, x, d, start, fit.lam, 1000, args.flow)
        gain = after - before
        print(f"{args.run_dir}, first {len(x)} {args.split} images: diagonal q* "
              f"{float(before.mean()):.3f}, {args.flow} q* gains {float(gain.mean()):.3f} "
              f"(± {float(gain.std() / len(x) ** 0.5):.3f} over images), "
              f"{float(fit.steps.double().mean()):.0f} steps, {seconds:.0f} s")


if __name__ == "__main__":
    main()
