"""The MNIST gap report with the default settings, for comparing code versions.

Measures the gap report of a trained run on the first N test images (``GapConfig``'s
defaults: IWAE-5000, 1,000-sample ELBOs, q* by fit_local from the encoder) and prints
L[q*], the gaps and the seconds of each route as one JSON line. Run it with
``PYTHONPATH`` pointing at another checkout's ``src`` to compare versions on the same
model and data; alternate the versions and compare medians (benchmarks/RESULTS.md).

    python benchmarks/mnist_gap.py --run-dir runs/bmnist-ffg --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

import amortized
from amortized.config import GapConfig
from amortized.data import load_dataset
from amortized.train import load_run, prepare_split

try:  # wherever the version being measured keeps the study
    from amortized.apps.study import measure_gaps
except ImportError:  # versions before the concept folders
    from amortized.study import measure_gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = load_run(args.run_dir)
    dataset = load_dataset(trained.config.dataset, args.data_dir)
    x = prepare_split(dataset, "test", trained.config.likelihood)[: args.points]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = measure_gaps(trained, x, GapConfig(), progress=False)
    seconds = time.perf_counter() - start
    fam = report.encoder_family

    def q(value):
        return {k: round(v, 4) for k, v in vars(value).items()}

    print(json.dumps({
        "code": amortized.__file__,
        "n": report.n,
        "seconds": round(seconds, 1),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "log_px": q(report.log_px),
        "elbo_local": q(report.elbo_local[fam]),
        "elbo_amortized": q(report.elbo_amortized),
        "approximation_gap": q(report.approximation_gap[fam]),
        "amortization_gap": q(report.amortization_gap),
        "seconds_per_datapoint": {k: round(v, 5) for k, v in report.seconds_per_datapoint.items()},
        "local_fit": report.local_fit,
        "khat": getattr(report, "log_px_khat", None),
        "warnings": [str(w.message)[:160] for w in caught],
    }))


if __name__ == "__main__":
    main()
