"""Closing the amortization gap: VAE, SA-VAE, VAE+SVI and iterative inference compared.

Each route trains its own model with the same decoder (784-200-200-50 tanh MLP,
Bernoulli), data and number of epochs; this script measures every trained run on the
same random test images with the gap report (IWAE-5000 log p(x) from the diagonal q*,
L[q*] from per-datapoint optimisation, L[q] of the route) and prints the issue's table:
test ELBO of each route, log p(x), amortization gap (L[q*] - L[route], on the route's own
model) and inference time per datapoint, plus the share of the plain VAE's gap closed.
It also writes the ELBO-against-inference-time plot.

    for inf in savae iterative amortized vae+svi; do
      amortized train --dataset binarized-mnist --data-dir ../shared/data --epochs 30 \\
          --svi-method sgd --svi-lr 0.01 --inference $inf --run-dir runs/bmnist30-$inf
    done
    python benchmarks/closing_gap.py --vae runs/bmnist30-amortized \\
        --savae runs/bmnist30-savae --vae-svi runs/bmnist30-vae+svi \\
        --iterative runs/bmnist30-iterative --points 1000 --out runs/closing_gap

Every run is refined at test time with the refinement its SA-VAE/VAE+SVI counterpart
trained with (the runs' own ``svi_*`` settings: SGD, momentum 0.5, the run's step size),
so "encoder + K steps" means the same update on every model. Reports are cached in
``--out`` (one JSON per run), so a rerun only redoes what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from amortized import GapReport, gap_report
from amortized.apps.plots import plot_bound_against_cost
from amortized.data import load_dataset
from amortized.estimators import elbo
from amortized.inference.iterative import IterativeEncoder
from amortized.train import Trained, evaluation_subset, load_run, prepare_split

REFINE_STEPS = (0, 1, 2, 5, 10, 20, 50, 100)
ROUTES = {
    "vae": "VAE", "savae": "SA-VAE", "vae_svi": "VAE+SVI", "iterative": "iterative",
    "iterative_encoder": "iterative from an encoder",
}  # fmt: skip


def refine_settings(trained: Trained) -> dict:
    c = trained.config
    return {"method": c.svi_method, "lr": c.svi_lr}


def measure(trained: Trained, x, iwae_k: int, refine_kwargs: dict) -> GapReport:
    return gap_report(
        trained.model, x, trained.encoder, trained.family, iwae_k=iwae_k, elbo_samples=1000,
        local_kwargs={"steps": 2000, "lr": 0.02, "samples": 8, "batch_size": 500},
        refine_steps=REFINE_STEPS, refine_kwargs=refine_kwargs,
    )  # fmt: skip


def iterates(trained: Trained, x, elbo_samples: int = 1000) -> list[tuple[float, float]]:
    """(seconds per datapoint, L[q_t]) after t = 1..T updates of an iterative encoder (and
    at t = 0 when it starts from an encoder's output)."""
    encoder: IterativeEncoder = trained.encoder
    total, out = encoder.iterations, []
    if encoder.initial is not None:
        start = time.perf_counter()
        with torch.no_grad():
            lam = encoder.initial(x)
        seconds = (time.perf_counter() - start) / x.shape[0]
        with torch.no_grad():
            out.append(
                (seconds, float(elbo(trained.model, trained.family, lam, x, elbo_samples).mean()))
            )
    try:
        for t in range(1, total + 1):
            encoder.iterations = t
            start = time.perf_counter()
            lam = encoder(x).detach()
            seconds = (time.perf_counter() - start) / x.shape[0]
            with torch.no_grad():
                value = float(elbo(trained.model, trained.family, lam, x, elbo_samples).mean())
            out.append((seconds, value))
    finally:
        encoder.iterations = total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, name in ROUTES.items():
        ap.add_argument(f"--{key.replace('_', '-')}", help=f"run trained as {name}")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--points", type=int, default=1000, help="random test subset (0: all)")
    ap.add_argument("--iwae-k", type=int, default=5000)
    ap.add_argument("--out", default="runs/closing_gap", help="cached reports, table, plot")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {k: load_run(getattr(args, k)) for k in ROUTES if getattr(args, k)}
    if not runs:
        ap.error("give at least one run")
    config = next(iter(runs.values())).config
    data = load_dataset(config.dataset, config.data_dir or args.data_dir)
    x = prepare_split(data, "test", config.likelihood)
    x = evaluation_subset(x, args.points) if args.points else x
    refine_kwargs = refine_settings(runs.get("savae", next(iter(runs.values()))))

    reports: dict[str, GapReport] = {}
    for key, trained in runs.items():
        path = out / f"{key}.json"
        if not path.exists():
            start = time.time()
            measure(trained, x, args.iwae_k, refine_kwargs).to_json(path)
            print(f"{key}: gap report in {time.time() - start:.0f} s", flush=True)
        reports[key] = GapReport.from_json(path)
    if "vae" not in runs:
        print(f"reports in {out}; the table compares with the VAE's gap: add --vae")
        return

    k = runs.get("savae", runs["vae"]).config.svi_steps
    rows, curves, gaps = [], {}, {}
    vae_gap = reports["vae"].amortization_gap.mean

    def row(route, key, value, seconds):
        r = reports[key]
        q_star = r.elbo_local[r.encoder_family].mean
        gap = q_star - value
        rows.append({
            "route": route, "elbo": value, "log_px": r.log_px.mean, "q_star": q_star,
            "amortization_gap": gap, "closed": 1 - gap / vae_gap, "ms": seconds * 1e3,
        })  # fmt: skip

    for key, r in reports.items():
        sec, name = r.seconds_per_datapoint, ROUTES[key]
        enc = sec["encoder"]
        iterative = isinstance(runs[key].encoder, IterativeEncoder)
        label = "encoder (T updates)" if iterative else "encoder"
        row(f"{name}, {label}", key, r.elbo_amortized.mean, enc)
        if not iterative:
            refined = r.refinement[str(k)].mean
            row(f"{name}, encoder + {k} steps", key, refined, enc + sec[f"refine/{k}"])
        curve = [(enc + sec[f"refine/{s}"], q.mean) for s, q in r.refinement.items()]
        curves[f"{name}: encoder + K steps"] = curve
        if iterative:
            path = iterates(runs[key], x)
            if runs[key].encoder.initial is not None:  # lambda_0 alone: a row, not a point
                row(f"{name}, its lambda_0 encoder alone", key, path[0][1], path[0][0])
                path = path[1:]
            curves[f"{name}: t = 1..T updates"] = path
        q_star = r.elbo_local[r.encoder_family]
        curves[f"{name}: q* (fit_local)"] = [(enc + sec[f"local/{r.encoder_family}"], q_star.mean)]
        gaps.update({
            route: [(t, q_star.mean - v) for t, v in pts]
            for route, pts in curves.items() if route.startswith(name + ":")
        })  # fmt: skip

    lines = [
        f"{len(x)} random test images of {config.dataset}; refinement: {refine_kwargs}, "
        f"K = {k}; log p(x): {reports['vae'].log_px_method}",
        "",
        "| route | test L[q] | log p(x) | L[q*] | amortization gap | share of VAE gap closed "
        "| ms per image |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['route']} | {r['elbo']:.2f} | {r['log_px']:.2f} | {r['q_star']:.2f} | "
        f"{r['amortization_gap']:.2f} | {100 * r['closed']:.0f}% | {r['ms']:.3f} |"
        for r in rows
    ]
    for key, trained in runs.items():
        lines.append(f"\n{ROUTES[key]}: {trained.run_dir} ({trained.config.epochs} epochs)")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    plot = plot_bound_against_cost(
        {"test L[q] (each route's own model)": curves, "amortization gap L[q*] - L[q]": gaps},
        out / "bound_against_time.png",
    )
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
