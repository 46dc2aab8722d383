"""How far can log p(x) be trusted on a trained model? AIS beside IWAE, and BDMC sandwiches.

1. On data simulated from the model, BDMC (Grosse et al. 2015) runs forward AIS from the
   prior (a stochastic lower bound on log p(x)) and reverse AIS from the latent that made
   each x (an upper bound), for several schedule lengths: the width of the sandwich is
   the measured error of AIS with that schedule.
2. On real test images, AIS from the per-datapoint diagonal q* beside IWAE-k from the
   same q*: both are stochastic lower bounds, so the larger is the better estimate.

    python benchmarks/ais_bdmc.py --run-dir runs/bmnist-ffg --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import time

import torch

from amortized import fit_local, iwae_bound
from amortized.data import load_dataset
from amortized.measure.ais import ais, bdmc
from amortized.train import evaluation_subset, load_run, prepare_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--simulated", type=int, default=50, help="BDMC datapoints")
    parser.add_argument("--bdmc-steps", default="100,500,2000")
    parser.add_argument("--points", type=int, default=100, help="random test images")
    parser.add_argument("--ais-steps", type=int, default=500)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--iwae-k", type=int, default=5000)
    args = parser.parse_args()

    trained = load_run(args.run_dir)
    model, family = trained.model, trained.family
    for p in model.parameters():
        p.requires_grad_(False)

    print(f"BDMC on {args.simulated} datapoints simulated from {args.run_dir}, "
          f"{args.chains} chains")  # fmt: skip
    print(f"{'steps':>6s} {'forward':>10s} {'reverse':>10s} {'gap':>7s} {'accept':>7s} {'s':>6s}")
    for steps in (int(s) for s in args.bdmc_steps.split(",")):
        torch.manual_seed(0)  # the same simulated data for every schedule
        start = time.perf_counter()
        _, lower, upper = bdmc(model, args.simulated, steps=steps, chains=args.chains)
        seconds = time.perf_counter() - start
        lo, hi = float(lower.log_px.mean()), float(upper.log_px.mean())
        print(f"{steps:6d} {lo:10.3f} {hi:10.3f} {hi - lo:7.3f} "
              f"{float(lower.acceptance.mean()):7.2f} {seconds:6.0f}")  # fmt: skip

    dataset = load_dataset(trained.config.dataset, args.data_dir)
    x = evaluation_subset(prepare_split(dataset, "test", trained.config.likelihood), args.points)
    torch.manual_seed(0)
    with torch.no_grad():
        lam_q = trained.encoder(x)
    lam = fit_local(model, family, x, lam_q).lam
    print(f"\n{len(x)} random test images, proposal: the per-datapoint {family.name} q*")
    with torch.no_grad():
        start = time.perf_counter()
        value, se = iwae_bound(model, family, lam, x, args.iwae_k, stderr=True)
        seconds = time.perf_counter() - start
    se = float(se.square().sum().sqrt()) / len(x)
    print(f"IWAE-{args.iwae_k}: {float(value.mean()):.3f} (s.e. {se:.3f}), {seconds:.0f} s")
    start = time.perf_counter()
    result = ais(model, x, family, lam, steps=args.ais_steps, chains=args.chains)
    seconds = time.perf_counter() - start
    print(f"AIS, {args.ais_steps} steps x {args.chains} chains: "
          f"{float(result.log_px.mean()):.3f} (s.e. "
          f"{float(result.stderr.square().sum().sqrt()) / len(x):.3f}), "
          f"acceptance {float(result.acceptance.mean()):.2f}, {seconds:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
