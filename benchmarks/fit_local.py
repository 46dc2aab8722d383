"""Throughput of per-datapoint VI: batched ``fit_local`` against one datapoint at a time.

Both routes run the same optimiser (Adam), step size, samples per gradient and number
of steps from the prior, on the same model and data; the loop is what one writes for
classical VI without batching (a ``torch.optim.Adam`` over one datapoint's lambda).
Their final ELBOs are evaluated with the same estimator (1,000 samples) to show the
answers agree. A third row runs ``fit_local`` with its default stopping rule.

    python benchmarks/fit_local.py                     # random-init 784-200-200-50 model
    python benchmarks/fit_local.py --run-dir runs/bmnist-ffg --data-dir ../shared/data

Prints one table; figures go into benchmarks/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from amortized import DiagonalGaussian, elbo, fit_local
from amortized.config import TrainConfig
from amortized.data import load_dataset
from amortized.train import build, load_run, prepare_split


def loop_fit(model, family, x, steps, lr, samples):
    """Classical VI one datapoint at a time: the baseline without batching."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        lam = family.prior_init(1).requires_grad_(True)
        opt = torch.optim.Adam([lam], lr=lr)
        for _ in range(steps):
            loss = -elbo(model, family, lam, xi, samples).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(lam.detach())
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=None, help="a trained run (default: random init)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batched-points", type=int, default=1000)
    parser.add_argument("--loop-points", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.run_dir:
        trained = load_run(args.run_dir)
        model, family = trained.model, trained.family
        dataset = load_dataset(trained.config.dataset, args.data_dir)
    else:
        model, _, family = build(TrainConfig(), 784)
        dataset = load_dataset("mnist5k")
    for p in model.parameters():
        p.requires_grad_(False)
    x = prepare_split(dataset, "test", "bernoulli")[: args.batched_points]
    assert isinstance(family, DiagonalGaussian)

    def evaluate(lam, xs):
        torch.manual_seed(1)
        with torch.no_grad():
            return float(elbo(model, family, lam, xs, 1000).mean())

    common = dict(steps=args.steps, lr=args.lr, samples=args.samples)
    rows = []
    start = time.perf_counter()
    lam = loop_fit(model, family, x[: args.loop_points], **common)
    seconds = time.perf_counter() - start
    rows.append(("one at a time (torch.optim.Adam)", args.loop_points, seconds,
                 evaluate(lam, x[: args.loop_points]), args.steps))  # fmt: skip

    start = time.perf_counter()
    fit = fit_local(model, family, x, tol=-float("inf"), **common)  # never stops early
    seconds = time.perf_counter() - start
    rows.append(("fit_local, fixed steps", len(x), seconds, evaluate(fit.lam, x), args.steps))
    same = evaluate(fit.lam[: args.loop_points], x[: args.loop_points])

    start = time.perf_counter()
    fit = fit_local(model, family, x, steps=2000, lr=args.lr, samples=args.samples)
    seconds = time.perf_counter() - start
    rows.append(("fit_local, stopping rule (<= 2000)", len(x), seconds, evaluate(fit.lam, x),
                 float(fit.steps.float().mean())))  # fmt: skip

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model: {args.run_dir or 'random init'}")  # fmt: skip
    print(
        f"{'route':38s} {'points':>6s} {'seconds':>8s} {'points/s':>9s} {'ELBO':>9s} {'steps':>6s}"
    )
    for name, n, sec, value, steps in rows:
        print(f"{name:38s} {n:6d} {sec:8.2f} {n / sec:9.2f} {value:9.3f} {steps:6.0f}")
    print(f"fit_local fixed steps on the loop's {args.loop_points} points: ELBO {same:.3f}")
    print(f"speed-up of fit_local (fixed steps) over the loop: "
          f"{(rows[1][1] / rows[1][2]) / (rows[0][1] / rows[0][2]):.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
