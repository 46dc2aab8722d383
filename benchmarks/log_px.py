"""Throughput of the log p(x) estimators on test images: IWAE-k and AIS.

    python benchmarks/log_px.py --run-dir runs/bmnist-ffg --data-dir ../shared/data

Both start from the encoder's q (the gap report draws them from q*, which costs the same
per evaluation). IWAE-k evaluates the decoder k times per image; AIS with S steps, C
chains and L leapfrog steps evaluates it and its input gradient C (S L + 1) times. The
achieved FLOP/s count the matrix products as PyTorch's FLOP counter sees them on a few
images (``peak.counted_flops``; printed beside the analytical count: a forward pass is
2 MACs per weight, an input gradient as much again), read on this process's CPU time
against the matmul peak read the same way (``peak.py``), so another job on the same
cores does not lower them; wall time and CPU over wall are printed beside. Pass
``--device cuda`` where a GPU is available (wall time there).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from peak import clock, counted_flops, decoder_macs, peak_flops, sync

from amortized import iwae_bound
from amortized.data import load_dataset
from amortized.measure.ais import ais
from amortized.train import evaluation_subset, load_run, prepare_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--points", type=int, default=500, help="random test images (0: all)")
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--iwae-batch", type=int, default=100)
    parser.add_argument("--ais-steps", type=int, default=100)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    trained = load_run(args.run_dir, device=device)
    model, encoder, family = trained.model, trained.encoder, trained.family
    dataset = load_dataset(trained.config.dataset, args.data_dir)
    x = evaluation_subset(prepare_split(dataset, "test", "bernoulli"), args.points).to(device)
    macs = decoder_macs(model)
    leapfrog = 10  # ais()'s default
    with torch.no_grad():
        lam = torch.cat([encoder(xb) for xb in x.split(args.iwae_batch)])

    def iwae(xs, ls):
        with torch.no_grad():
            return torch.cat([
                iwae_bound(model, family, ls[i : i + args.iwae_batch], xs[i : i + args.iwae_batch],
                           args.iwae_k)
                for i in range(0, len(xs), args.iwae_batch)
            ])  # fmt: skip

    def annealed(xs, ls):
        return torch.cat([
            ais(model, xs[i : i + args.ais_batch], family, ls[i : i + args.ais_batch],
                steps=args.ais_steps, chains=args.ais_chains).log_px
            for i in range(0, len(xs), args.ais_batch)
        ])  # fmt: skip

    ais_evals = args.ais_chains * (args.ais_steps * leapfrog + 1)  # decoder passes per image
    estimators = [
        (f"IWAE-{args.iwae_k}", iwae, 2 * macs * args.iwae_k),
        (f"AIS, {args.ais_steps} steps x {args.ais_chains} chains x {leapfrog} leapfrog",
         annealed, 2 * 2 * macs * ais_evals),  # a pass and its input gradient
    ]  # fmt: skip
    now, few = clock(device), min(len(x), 4)
    counted = [counted_flops(lambda run=run: run(x[:few], lam[:few])) / few  # per image
               for _, run, _ in estimators]  # fmt: skip
    times: list[list[tuple[float, float]]] = [[] for _ in estimators]
    values = [0.0] * len(estimators)
    for _ in range(args.repeats):  # alternating, so both see the machine's same moods
        for i, (_, run, _) in enumerate(estimators):
            torch.manual_seed(0)
            sync(device)
            wall, cpu = time.perf_counter(), now()
            values[i] = float(run(x, lam).mean())
            sync(device)
            times[i].append((now() - cpu, time.perf_counter() - wall))
    rows = []
    for (name, _, analytical), count, value, ts in zip(estimators, counted, values, times,
                                                        strict=True):  # fmt: skip
        cpu = sorted(t[0] for t in ts)
        wall = statistics.median(t[1] for t in ts)
        rows.append((name, wall, cpu, value, count, analytical))

    peak = peak_flops(device)
    print(f"{len(x)} test images of {trained.config.dataset}, model {args.run_dir}, "
          f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (by {'CPU' if device.type == 'cpu' else 'wall'} "
          f"time); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")  # fmt: skip
    print(f"\n{args.repeats} alternating runs; times are medians (min-max)")
    print("\n| estimator | wall s | CPU / wall | ms/image | mean log p(x) | "
          "MFLOP/image counted (analytical) | GFLOP/s | of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, wall, cpu, value, count, analytical in rows:
        seconds = statistics.median(cpu) if device.type == "cpu" else wall
        achieved = count * len(x) / seconds
        print(f"| {name} | {wall:.1f} | {statistics.median(cpu) / wall:.2f} | "
              f"{1e3 * seconds / len(x):.1f} ({1e3 * cpu[0] / len(x):.1f}-"
              f"{1e3 * cpu[-1] / len(x):.1f}) | {value:.2f} | {count / 1e6:.1f} "
              f"({analytical / 1e6:.1f}) | {achieved / 1e9:.1f} | "
              f"{achieved / peak:.0%} |")  # fmt: skip
    full = 10000
    for name, wall, *_ in rows:
        print(f"{name}: the full test set ({full} images) would take "
              f"{math.ceil(wall / len(x) * full)} s of wall time at this rate")  # fmt: skip


if __name__ == "__main__":
    main()
