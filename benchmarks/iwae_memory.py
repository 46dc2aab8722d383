"""Peak memory of an IWAE-k bound and its gradient, keeping every chunk's graph or
recomputing each chunk in the backward pass (what ``iwae_bound`` does past
``GRAD_KEPT_ELEMENTS``).

    python benchmarks/iwae_memory.py                 # k = 20,000, 200,000 and 1,000,000

"default" is the library as it is (chunks recomputed only past 2^25 elements of x in
all: k > 42,799 for one MNIST image); "every chunk kept" raises that limit out of reach.
Each measurement runs in a fresh process (peak resident memory is per process): one
binarized 784-pixel image, a 50-latent Bernoulli MLP decoder (200, 200), lambda at the
prior, one thread. Prints k, the mode, the bound, the gradient's norm (the same in both
modes), the peak resident memory and the seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch
from amortized import LatentVariableModel, DiagonalGaussian
from amortized.nets.decoders import BernoulliMLPDecoder
import amortized.estimators as E
torch.manual_seed(0); torch.set_num_threads(1)
k, mode = int(sys.argv[1]), sys.argv[2]
if mode == "keep":
    E.GRAD_KEPT_ELEMENTS = 10**18
model = LatentVariableModel(BernoulliMLPDecoder(50, 784, hidden=(200, 200)), 50)
family = DiagonalGaussian(50)
x = (torch.rand(1, 784) < 0.3).float()
lam = family.prior_init(1).requires_grad_(True)
start = time.perf_counter()
value = E.iwae_bound(model, family, lam, x, k)
value.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
graph = "every chunk kept" if mode == "keep" else "default"
print(f"| {k:,} | {graph} | {value.item():.4f} | {lam.grad.norm().item():.6f} | {peak:.0f} "
      f"| {time.perf_counter() - start:.1f} |")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", default="20000,200000,1000000")
    parser.add_argument("--keep-up-to", type=int, default=200_000,
                        help="largest k also measured keeping every chunk's graph")
    args = parser.parse_args()
    print("| k | graph | IWAE bound | gradient norm | peak RSS (MB) | seconds |")
    print("|---|---|---|---|---|---|")
    for k in (int(v) for v in args.k.split(",")):
        modes = ["keep", "default"] if k <= args.keep_up_to else ["default"]
        for mode in modes:
            subprocess.run([sys.executable, "-c", CHILD, str(k), mode], check=True)


if __name__ == "__main__":
    main()
