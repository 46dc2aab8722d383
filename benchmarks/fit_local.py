"""Throughput of per-datapoint VI: batched ``fit_local`` against one datapoint at a time.

Both routes run the same optimiser (Adam), step size, samples per gradient and number
of steps from the prior, on the same model and data; the loop is what one writes for
classical VI without batching (a ``torch.optim.Adam`` over one datapoint's lambda).
Their final ELBOs are evaluated with the same estimator (1,000 samples) to show the
answers agree. A third row runs ``fit_local`` with its default stopping rule.

    python benchmarks/fit_local.py                     # random-init 784-200-200-50 model
    python benchmarks/fit_local.py --run-dir runs/bmnist-ffg --data-dir ../shared/data
    python benchmarks/fit_local.py ... --device cuda      # on a GPU

Achieved FLOP/s counts the decoder's matrix products of the gradient steps only (its
forward and input-gradient backward per sample; the stopping rule's checks are not
counted), against this machine's matmul peak. Prints one table; figures go into
benchmarks/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from peak import decoder_macs, peak_flops, sync

from amortized import DiagonalGaussian, elbo, fit_local
from amortized.config import TrainConfig
from amortized.data import load_dataset
from amortized.train import build, load_run, prepare_split


def loop_fit(model, family, x, steps, lr, samples):
    """Classical VI one datapoint at a time: the baseline without batching."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        lam = family.prior_init(1, device=x.device).requires_grad_(True)
        opt = torch.optim.Adam([lam], lr=lr)
        for _ in range(steps):
            loss = -elbo(model, family, lam, xi, samples).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(lam.detach())
    sync(x.device)
    return torch.cat(out)


PYRO_FIXED = "Pyro SVI, AutoNormal, plate, fixed steps"
PYRO_EQUAL = "Pyro, until fit_local's ELBO"


def pyro_fit(model, family, x, steps, lr, samples, until=None, evaluate=None, check_every=25):
    """Pyro's way: a plate over the datapoints' local z, an AutoNormal guide, SVI with the
    analytic KL (TraceMeanField_ELBO), particles vectorized.

    Runs ``steps`` steps; or, with ``until``, as many as it takes (checked every
    ``check_every``, at most 10 x ``steps``) for ``evaluate(lambda)`` to reach ``until``.
    Returns lambda as ours, the steps taken and the seconds spent stepping (checks not
    counted)."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceMeanField_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_value

    pyro.clear_param_store()
    d = family.latent_dim

    def pyro_model(xs):
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(d), 1.0).to_event(1))
            logits = model.decoder.net(z)  # the same decoder network, held fixed
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    # start where ours starts: the prior, N(0, I)
    guide = AutoNormal(pyro_model, init_loc_fn=init_to_value(values={"z": x.new_zeros(len(x), d)}),
                       init_scale=1.0)  # fmt: skip
    elbo_fn = TraceMeanField_ELBO(num_particles=samples, vectorize_particles=True)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": lr}), loss=elbo_fn)

    def lam():
        return torch.cat([guide.locs.z.detach(), guide.scales.z.detach().log()], dim=-1)

    taken, seconds = 0, 0.0
    while taken < (steps if until is None else 10 * steps):
        start = time.perf_counter()
        for _ in range(steps if until is None else check_every):
            svi.step(x)
        sync(x.device)
        seconds += time.perf_counter() - start
        taken += steps if until is None else check_every
        if until is not None and evaluate(lam(), x) >= until:
            break
    return lam(), taken, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=None, help="a trained run (default: random init)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batched-points", type=int, default=1000)
    parser.add_argument("--loop-points", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--skip-stopping-rule", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.run_dir:
        trained = load_run(args.run_dir, device=device)
        model, family = trained.model, trained.family
        dataset = load_dataset(trained.config.dataset, args.data_dir)
    else:
        model, _, family = build(TrainConfig(), 784)
        model.to(device)
        dataset = load_dataset("mnist5k")
    for p in model.parameters():
        p.requires_grad_(False)
    x = prepare_split(dataset, "test", "bernoulli")[: args.batched_points].to(device)
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
    sync(device)
    seconds = time.perf_counter() - start
    rows.append(("fit_local, fixed steps", len(x), seconds, evaluate(fit.lam, x), args.steps))
    same = evaluate(fit.lam[: args.loop_points], x[: args.loop_points])

    if not args.skip_stopping_rule:
        start = time.perf_counter()
        fit = fit_local(model, family, x, steps=2000, lr=args.lr, samples=args.samples)
        sync(device)
        seconds = time.perf_counter() - start
        rows.append(("fit_local, stopping rule (<= 2000)", len(x), seconds,
                     evaluate(fit.lam, x), float(fit.steps.float().mean())))  # fmt: skip

    try:
        import pyro  # noqa: F401
    except ImportError:
        print("pyro not installed (pip install -e '.[bench]'): its row is left out")
    else:
        lam, _, seconds = pyro_fit(model, family, x, **common)
        rows.append((PYRO_FIXED, len(x), seconds, evaluate(lam, x), args.steps))
        target = rows[1][3]  # fit_local's ELBO after its fixed steps
        lam, taken, seconds = pyro_fit(model, family, x, **common, until=target, evaluate=evaluate)
        rows.append((PYRO_EQUAL, len(x), seconds, evaluate(lam, x), taken))

    # a step's arithmetic per datapoint: the decoder's forward and its input-gradient
    # backward (no weight gradients: the model is fixed), 2 x 2 MACs per sample
    step_flops = 4 * decoder_macs(model) * args.samples
    peak = peak_flops(device)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; model: {args.run_dir or 'random init'}")  # fmt: skip
    print(f"{'route':38s} {'points':>6s} {'seconds':>8s} {'points/s':>9s} {'ELBO':>9s} "
          f"{'steps':>6s} {'GFLOP/s':>8s} {'of peak':>7s}")  # fmt: skip
    for name, n, sec, value, steps in rows:
        achieved = n * steps * step_flops / sec
        print(f"{name:38s} {n:6d} {sec:8.2f} {n / sec:9.2f} {value:9.3f} {steps:6.0f} "
              f"{achieved / 1e9:8.2f} {achieved / peak:7.1%}")  # fmt: skip
    print(f"fit_local fixed steps on the loop's {args.loop_points} points: ELBO {same:.3f}")
    rate = {name: n / sec for name, n, sec, _, _ in rows}
    ours = rate["fit_local, fixed steps"]
    print(f"fit_local (fixed steps) over the loop: {ours / rate[rows[0][0]]:.0f}x")
    if PYRO_FIXED in rate:
        print(f"fit_local over Pyro, equal steps: {ours / rate[PYRO_FIXED]:.2f}x; "
              f"to Pyro's first check at or above fit_local's ELBO: "
              f"{ours / rate[PYRO_EQUAL]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
