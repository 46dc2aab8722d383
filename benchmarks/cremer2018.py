"""Cremer, Li & Duvenaud (2018), Table 2 layout: gaps of an FFG-trained and a flow-trained VAE.

For each trained run (one whose encoder outputs a diagonal Gaussian, one whose encoder
outputs a flow), measures on the same test images: log p(x) (IWAE, optionally AIS too),
L[q*] of the flow family and of the diagonal Gaussian, each optimised per datapoint,
L[q] of the encoder, and the gaps; prints them beside the paper's MNIST figures.

    python benchmarks/cremer2018.py --ffg runs/bmnist-ffg --flow runs/bmnist-planar \
        --data-dir ../shared/data --points 1000

Our flow family is planar (Rezende & Mohamed 2015); the paper's is an auxiliary flow, so
the flow columns compare families of similar purpose, not identical ones.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from amortized import DiagonalGaussian, PlanarFlow, gap_report
from amortized.data import load_dataset
from amortized.train import Trained, evaluation_subset, load_run, prepare_split

#: Table 2 of the paper, MNIST, FFG-trained encoder (as quoted in our issue tracker).
PAPER_FFG = {
    "log p(x)": -89.80,
    "L[q*] flow": -90.80,
    "L[q*] diagonal": -91.23,
    "L[q] encoder": -92.57,
    "approximation gap": 1.43,
    "amortization gap": 1.34,
}


def cremer_columns(trained: Trained, x, iwae_k: int, ais_steps: int) -> dict:
    """One column of the table: the run's own family and the other one, per datapoint."""
    d = trained.config.latent_dim
    other = PlanarFlow(d) if trained.family.name == "diagonal" else DiagonalGaussian(d)
    report = gap_report(
        trained.model, x, trained.encoder, trained.family, families=[other], iwae_k=iwae_k,
        ais_steps=ais_steps, elbo_samples=1000,
        local_kwargs={"steps": 2000, "lr": 0.02, "samples": 8, "batch_size": 1000},
    )  # fmt: skip

    def pair(q):
        return (q.mean, q.stderr)

    return {
        "log p(x)": pair(report.log_px),
        "log p(x) method": report.log_px_method,
        "L[q*] flow": pair(report.elbo_local["planar"]),
        "L[q*] diagonal": pair(report.elbo_local["diagonal"]),
        "L[q] encoder": pair(report.elbo_amortized),
        "approximation gap": pair(report.approximation_gap[trained.family.name]),
        "amortization gap": pair(report.amortization_gap),
        "seconds per datapoint": report.seconds_per_datapoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ffg", required=True, help="run trained with --family diagonal")
    parser.add_argument("--flow", required=True, help="run trained with --family planar")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--points", type=int, default=1000, help="random test subset (0: all)")
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--ais-steps", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the table as JSON")
    args = parser.parse_args()

    columns = {}
    for name, run_dir in (("FFG-trained", args.ffg), ("flow-trained", args.flow)):
        trained = load_run(run_dir)
        dataset = load_dataset(trained.config.dataset, args.data_dir)
        x = evaluation_subset(prepare_split(dataset, "test", "bernoulli"), args.points)
        start = time.perf_counter()
        torch.manual_seed(0)
        columns[name] = cremer_columns(trained, x, iwae_k=args.iwae_k, ais_steps=args.ais_steps)
        columns[name]["seconds"] = time.perf_counter() - start
    rows = list(PAPER_FFG)
    print(f"{len(x)} test images; nats per datapoint (MC s.e. in the JSON)")
    print(f"{'':20s} {'FFG-trained':>12s} {'paper FFG':>10s} {'flow-trained':>13s}")
    for row in rows:
        ffg, flow = columns["FFG-trained"][row][0], columns["flow-trained"][row][0]
        print(f"{row:20s} {ffg:12.2f} {PAPER_FFG[row]:10.2f} {flow:13.2f}")
    for name, column in columns.items():
        print(f"{name}: {column['seconds']:.0f} s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(columns, f, indent=2)


if __name__ == "__main__":
    main()
