"""Are the stated errors honest? Three tables, every reference exact.

1. ``estimators``: the Monte Carlo error of log mean(w) over datapoints, as each candidate
   method states it, against the real spread over repeats. Target N(0, I_d), proposal
   N(0, s^2 I_d): log p(x) = 0 exactly, and in one dimension the weights' tail has
   shape k = 1 - s^2. Candidates: the delta method (what the library states), the spread
   of B independent batches of draws over sqrt(B), the jackknife over draws, and the
   delta method on Pareto-smoothed weights.
2. ``calibration``: repeated gap reports (new seeds, same datapoints) on a linear-Gaussian
   model whose diagonal q* gives IWAE heavy-tailed weights, and on the nonlinear 2-D
   model: the spread of log p(x) and of the gaps against their stated Monte Carlo error.
3. ``nonlinear``: IWAE, AIS and the gap report's log p(x) against the exact value from a
   dense grid, on the nonlinear 2-D Bernoulli model at three decoder weight scales, with
   the k-hat summary that flags the untrustworthy rows.

    python benchmarks/error_bars.py                  # all three, about 10 minutes
    python benchmarks/error_bars.py --only estimators
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nonlinear import NonlinearBernoulli  # noqa: E402
from test_error_bars import heavy_tailed_model  # noqa: E402
from test_gaps import ShrunkPosteriorEncoder  # noqa: E402
from test_nonlinear import _PriorEncoder  # noqa: E402

from amortized import DiagonalGaussian, FullCovarianceGaussian, gap_report  # noqa: E402
from amortized.weights import LogMeanWeight, pareto_fit, tail_size  # noqa: E402

DTYPE = torch.float64


def _log_weights(s2: float, d: int, k: int, rows: int, g: torch.Generator) -> torch.Tensor:
    """log N(z; 0, I) - log N(z; 0, s2 I), z ~ N(0, s2 I): ``(k, rows)``."""
    z = torch.randn(k, rows, d, generator=g, dtype=DTYPE) * math.sqrt(s2)
    return (-0.5 * z.square() * (1 - 1 / s2)).sum(-1) + 0.5 * d * math.log(s2)


def _delta(log_w):
    k = log_w.shape[0]
    lse, lse2 = torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0)
    return ((torch.exp(lse2 - 2 * lse + math.log(k)) - 1).clamp_min(0) / k).sqrt()


def _batches(log_w, b):
    k = log_w.shape[0]
    per = torch.logsumexp(log_w.reshape(b, k // b, -1), 1) - math.log(k // b)
    return per.std(0) / math.sqrt(b)


def _jackknife(log_w):
    k = log_w.shape[0]
    w = torch.exp(log_w - log_w.max(0).values)
    loo = torch.log((w.sum(0) - w).clamp_min(1e-300))  # log sum without each draw
    return ((k - 1) / k * (loo - loo.mean(0)).square().sum(0)).sqrt()


def _smoothed_delta(log_w):
    """The delta method on weights whose largest M are replaced by the fitted Pareto's
    quantiles (PSIS, Vehtari et al. 2024)."""
    k = log_w.shape[0]
    m = tail_size(k)
    top, idx = log_w.topk(m + 1, dim=0)  # descending
    scale = top[:1]
    w = torch.exp(top - scale).flip(0).T  # (rows, M + 1) ascending
    u = w[:, :1]
    exceed = w[:, 1:] - u
    khat, sigma = pareto_fit(exceed)
    p = (torch.arange(1, m + 1, dtype=DTYPE) - 0.5) / m
    q = u + sigma[:, None] / khat[:, None] * ((1 - p) ** (-khat[:, None]) - 1)
    q = torch.minimum(q, w[:, -1:])  # no smoothed weight above the largest raw one
    smoothed = log_w.clone()
    smoothed.scatter_(0, idx[:m], (q.flip(-1).T.log() + scale))
    return _delta(smoothed)


def estimators(args) -> None:
    print("\n## 1. Monte Carlo error of a mean of log mean(w) over 100 datapoints")
    print(f"k = {args.k} draws per datapoint, {args.reps} repeats; each cell is the median "
          "over repeats of the stated error of the mean, and its ratio to the real spread")
    print("| s^2, d | median k-hat | real spread | delta | batches B=10 | batches B=50 | "
          "jackknife | Pareto-smoothed delta |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    n = 100
    for s2, d in [(0.8, 1), (0.6, 1), (0.5, 1), (0.4, 1), (0.7, 4), (0.6, 4), (0.5, 6)]:
        means, stated, khats = [], {k: [] for k in ("delta", "b10", "b50", "jack", "psis")}, []
        for _ in range(args.reps):
            log_w = _log_weights(s2, d, args.k, n, g)
            acc = LogMeanWeight(args.k)
            acc.add(log_w)
            est = acc.result()
            means.append(float(est.log_px.mean()))
            khats.append(float(est.khat.median()))
            for name, se in (("delta", est.stderr), ("b10", _batches(log_w, 10)),
                             ("b50", _batches(log_w, 50)), ("jack", _jackknife(log_w)),
                             ("psis", _smoothed_delta(log_w))):  # fmt: skip
                stated[name].append(float(se.square().sum().sqrt()) / n)
        real = float(np.std(means, ddof=1))
        cells = [f"{np.median(v):.5f} ({np.median(v) / real:.2f})" for v in stated.values()]
        print(f"| {s2}, {d} | {np.median(khats):.2f} | {real:.5f} | " + " | ".join(cells) + " |")


def _calibrate(label, make, reps):
    rows = {k: [] for k in ("log p(x) by IWAE", "log p(x) by AIS", "approximation gap",
                            "amortization gap")}  # fmt: skip
    start, above, medians = time.perf_counter(), [], []
    for seed in range(reps):
        r = make(seed)
        rows["log p(x) by IWAE"].append(r.log_px_estimates["iwae"])
        if "ais" in r.log_px_estimates:
            rows["log p(x) by AIS"].append(r.log_px_estimates["ais"])
        rows["approximation gap"].append(r.approximation_gap[r.encoder_family])
        rows["amortization gap"].append(r.amortization_gap)
        above.append(r.log_px_weights["iwae"]["above"] / r.n)
        medians.append(r.log_px_weights["iwae"]["median"])
    seconds = time.perf_counter() - start
    print(f"# {label}: {reps} reports, {seconds:.0f} s; IWAE weights: median k-hat "
          f"{np.median(medians):.2f}, {np.mean(above):.1%} of rows above the threshold")
    for name, qs in rows.items():
        if not qs:
            continue
        spread = np.std([q.mean for q in qs], ddof=1)
        stated = math.sqrt(np.mean([q.mc_se**2 for q in qs]))
        data = np.mean([q.data_se for q in qs])
        print(f"| {label} | {name} | {spread:.4f} | {stated:.4f} | {spread / stated:.2f} "
              f"| {data:.4f} |")


def calibration(args) -> None:
    print("\n## 2. Stated Monte Carlo error against the spread over repeated reports")
    print("| model | quantity | spread over repeats | stated MC s.e. (rms) | ratio | "
          "stated s.e. over datapoints |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    lg = heavy_tailed_model()
    x = lg.sample_x(40)

    def linear(seed):
        return gap_report(lg.model, x, ShrunkPosteriorEncoder(lg), DiagonalGaussian(2),
                          iwae_k=2000, elbo_samples=500, ais_steps=100, seed=seed)  # fmt: skip

    m = NonlinearBernoulli(weight_scale=1.5)
    xn = m.sample_x(40)

    def nonlinear(seed):
        return gap_report(m.model, xn, _PriorEncoder(), DiagonalGaussian(2), iwae_k=2000,
                          elbo_samples=500, ais_steps=100, seed=seed)  # fmt: skip

    _calibrate("linear-Gaussian, corr 0.55, n=40", linear, args.reps_reports)
    _calibrate("nonlinear 2-D Bernoulli, n=40", nonlinear, args.reps_reports)


def nonlinear(args) -> None:
    print("\n## 3. log p(x) on the nonlinear 2-D model against the exact grid value")
    print("| decoder weight scale | exact | IWAE-5000 error | AIS-200x16 error | report's "
          "log p(x) error | highest lower bound - exact | IWAE k-hat median, rows above 0.7 |")
    print("|---|---|---|---|---|---|---|")
    for scale in (1.0, 1.5, 2.5):
        m = NonlinearBernoulli(weight_scale=scale)
        x = m.sample_x(40)
        exact = float(m.log_px(x, points=401).mean())
        r = gap_report(m.model, x, _PriorEncoder(), DiagonalGaussian(2),
                       families=[FullCovarianceGaussian(2)], iwae_k=5000, ais_steps=200,
                       seed=0)  # fmt: skip
        e = r.log_px_estimates
        bounds = [r.elbo_amortized.mean, *(q.mean for q in r.elbo_local.values()),
                  e["iwae"].mean, e["ais"].mean]  # fmt: skip
        k = r.log_px_weights["iwae"]
        print(f"| {scale} | {exact:.3f} | {e['iwae'].mean - exact:+.4f} ± {e['iwae'].mc_se:.4f} "
              f"| {e['ais'].mean - exact:+.4f} ± {e['ais'].mc_se:.4f} | "
              f"{r.log_px.mean - exact:+.4f} | {max(bounds) - exact:+.4f} | "
              f"{k['median']:.2f}, {k['above']:.0f} of {r.n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["estimators", "calibration", "nonlinear"])
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=200, help="repeats per estimator row")
    parser.add_argument("--reps-reports", type=int, default=40, help="gap reports per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f}")
    for name, fn in (("estimators", estimators), ("calibration", calibration),
                     ("nonlinear", nonlinear)):  # fmt: skip
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
