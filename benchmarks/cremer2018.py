"""Cremer, Li & Duvenaud (2018), Table 2 layout: gaps of an FFG-trained and a flow-trained VAE.

For each trained run (one whose encoder outputs a diagonal Gaussian, one whose encoder
outputs a flow), measures on the same test images: log p(x) (IWAE, optionally AIS too),
L[q*] of the flow family and of the diagonal Gaussian, each optimised per datapoint,
L[q] of the encoder, and the gaps; prints them beside the paper's MNIST figures.
``--split train --points 1000`` measures the first 1,000 training images instead, as the
paper's released code computed its Table 2.

    amortized train --dataset binarized-mnist --data-dir ../shared/data --epochs 300 \
        --patience 30 --run-dir runs/bmnist-ffg
    amortized train ... --family iaf --run-dir runs/bmnist-iaf
    python benchmarks/cremer2018.py --ffg runs/bmnist-ffg --flow runs/bmnist-iaf \
        --data-dir ../shared/data --points 0 --ais-steps 500

Our flow family is an inverse autoregressive flow (two MADE steps, every weight free per
datapoint, Kingma et al. 2016); the paper's is an auxiliary flow (Cremer et al. 2018),
so the flow rows compare families of similar purpose, not identical ones. Each family's
q* starts from the run's encoder: the encoder's own family at its output, the other
family moment-matched to that q* (so the flow starts where the diagonal q* ended).

The test set is measured in shards of ``--shard-size`` images, each saved to
``--shard-dir`` as soon as it is done (atomically): run the same command again after a
kill and it carries on from the first missing shard. The table merges the shards
(:func:`amortized.merge_reports`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from amortized import DiagonalGaussian, GapReport, gap_report, merge_reports
from amortized.data import load_dataset
from amortized.families import FAMILIES
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


def measure(trained: Trained, x, iwae_k: int, ais_steps: int, flow: str) -> GapReport:
    """Gaps of one run on x: the run's own family and the other one, per datapoint."""
    d = trained.config.latent_dim
    other = FAMILIES[flow](d) if trained.family.name == "diagonal" else DiagonalGaussian(d)
    return gap_report(
        trained.model, x, trained.encoder, trained.family, families=[other], iwae_k=iwae_k,
        ais_steps=ais_steps, elbo_samples=1000,
        local_kwargs={"steps": 2000, "lr": 0.02, "samples": 8, "batch_size": 500},
    )  # fmt: skip


def column(report: GapReport, flow: str) -> dict:
    """One column of the table, each entry (mean, MC standard error)."""

    def pair(q):
        return (q.mean, q.mc_se)

    return {
        "log p(x)": pair(report.log_px),
        "log p(x) method": report.log_px_method,
        "L[q*] flow": pair(report.elbo_local[flow]),
        "L[q*] diagonal": pair(report.elbo_local["diagonal"]),
        "L[q] encoder": pair(report.elbo_amortized),
        "approximation gap": pair(report.approximation_gap[report.encoder_family]),
        "amortization gap": pair(report.amortization_gap),
        "log p(x) estimates": {k: pair(v) for k, v in report.log_px_estimates.items()},
        "seconds per datapoint": report.seconds_per_datapoint,
        "points": report.n,
    }


def sharded_report(trained: Trained, x, args) -> GapReport:
    """The report over x, measured shard by shard; finished shards are kept and reused.

    Shards are cut from a fixed random permutation of x (the test split is sorted by
    digit), so every shard is a random sample and the finished ones already tell the story.
    """
    split = "" if args.split == "test" else "-train"  # test shards keep their old names
    out = Path(args.shard_dir) / f"{trained.run_dir.name}{split}-{len(x)}"
    out.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shards = []
    parts = list(enumerate(x[order].split(args.shard_size)))
    for k, part in reversed(parts) if args.reverse else parts:
        path = out / f"shard-{k:03d}.json"
        if not path.exists():
            start = time.perf_counter()
            torch.manual_seed(k)
            report = measure(trained, part, args.iwae_k, args.ais_steps, args.flow_family)
            tmp = path.with_suffix(".tmp")
            report.to_json(tmp)
            os.replace(tmp, path)  # a killed run leaves no half-written shard
            print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)
        shards.append((k, GapReport.from_json(path)))
        if args.max_shards and len(shards) == args.max_shards:
            break
    return merge_reports([report for _, report in sorted(shards, key=lambda s: s[0])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ffg", default=None, help="run trained with --family diagonal")
    parser.add_argument("--flow", default=None, help="run trained with the flow family")
    parser.add_argument("--flow-family", default="iaf", choices=["iaf", "planar"])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--points", type=int, default=1000,
                        help="test: a random subset of this many (0: all); train: the first "
                             "this many training images, as the paper's code took them")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--ais-steps", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--shard-dir", default="runs/cremer2018", help="finished shards")
    parser.add_argument("--max-shards", type=int, default=0, help="stop after this many")
    parser.add_argument("--reverse", action="store_true",
                        help="measure the shards last first: a second process started with "
                             "--reverse shares the work with one started without")  # fmt: skip
    parser.add_argument("--output", default=None, help="also write the table as JSON")
    args = parser.parse_args()
    if args.ffg is None and args.flow is None:
        parser.error("give --ffg, --flow or both (one process per run measures them in parallel)")

    columns = {}
    runs = {"FFG-trained": (args.ffg, "diagonal"), "flow-trained": (args.flow, args.flow_family)}
    for name, (run_dir, family) in runs.items():
        if run_dir is None:
            continue
        trained = load_run(run_dir)
        if trained.family.name != family:
            parser.error(f"{run_dir} was trained with --family {trained.family.name}, not {family}")
        dataset = load_dataset(trained.config.dataset, args.data_dir)
        x = prepare_split(dataset, args.split, "bernoulli")
        x = evaluation_subset(x, args.points) if args.split == "test" else x[: args.points]
        columns[name] = column(sharded_report(trained, x, args), args.flow_family)
        metrics = (trained.run_dir / "metrics.jsonl").read_text().splitlines()
        columns[name]["epochs trained"] = len(metrics)
    print("nats per datapoint; Monte Carlo standard errors are in the JSON")
    print(f"{'':20s} {'paper FFG':>10s}" + "".join(f" {name:>13s}" for name in columns))
    for row, paper in PAPER_FFG.items():
        print(f"{row:20s} {paper:10.2f}" + "".join(f" {c[row][0]:13.2f}" for c in columns.values()))
    for name, c in columns.items():
        seconds = sum(c["seconds per datapoint"].values()) * c["points"]
        print(f"{name}: {c['points']} {args.split} images, {c['epochs trained']} epochs trained, "
              f"{seconds:.0f} s of gap report; log p(x) from {c['log p(x) method']}")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(columns, f, indent=2)


if __name__ == "__main__":
    main()
