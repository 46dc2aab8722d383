"""Throughput of the log p(x) estimators on test images: IWAE-k and AIS.

    python benchmarks/log_px.py --run-dir runs/bmnist-ffg --data-dir ../shared/data

Both start from the encoder's q (the gap report draws them from q*, which costs the same
per evaluation). IWAE-k evaluates the decoder k times per image; AIS with S steps, C
chains and L leapfrog steps evaluates it and its gradient C (S L + S) times. Achieved
FLOP/s counts the decoder's matrix products (a gradient costs twice a forward pass) and
is compared with this machine's float32 matmul peak (``peak.py``), as in
``throughput.py``. Pass ``--device cuda`` where a GPU is available.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from peak import decoder_macs, peak_flops, sync

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

    rows = []
    torch.manual_seed(0)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        values = torch.cat([
            iwae_bound(model, family, lam[i : i + args.iwae_batch], x[i : i + args.iwae_batch],
                       args.iwae_k)
            for i in range(0, len(x), args.iwae_batch)
        ])  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    flops = 2 * macs * args.iwae_k * len(x)
    rows.append((f"IWAE-{args.iwae_k}", seconds, float(values.mean()), flops))

    torch.manual_seed(0)
    sync(device)
    start = time.perf_counter()
    values = torch.cat([
        ais(model, x[i : i + args.ais_batch], family, lam[i : i + args.ais_batch],
            steps=args.ais_steps, chains=args.ais_chains).log_px
        for i in range(0, len(x), args.ais_batch)
    ])  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    passes = args.ais_chains * args.ais_steps * (leapfrog + 1)  # gradients and energies
    flops = 2 * macs * 3 * passes * len(x)  # a gradient pass counted as 3 forward passes
    name = f"AIS, {args.ais_steps} steps x {args.ais_chains} chains x {leapfrog} leapfrog"
    rows.append((name, seconds, float(values.mean()), flops))

    peak = peak_flops(device)
    print(f"{len(x)} test images of {trained.config.dataset}, model {args.run_dir}, "
          f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print("\n| estimator | seconds | images/s | ms/image | mean log p(x) | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|")
    for name, sec, value, flops in rows:
        print(f"| {name} | {sec:.1f} | {len(x) / sec:.1f} | {1e3 * sec / len(x):.1f} | "
              f"{value:.2f} | {flops / sec / 1e9:.1f} | {flops / sec / peak:.0%} |")  # fmt: skip
    full = 10000
    for name, sec, _, _ in rows:
        print(f"{name}: the full test set ({full} images) would take "
              f"{math.ceil(sec / len(x) * full)} s at this rate")  # fmt: skip


if __name__ == "__main__":
    main()
