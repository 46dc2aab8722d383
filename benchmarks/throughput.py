"""VAE training throughput at the defaults: our trainer against hand loops, Pyro and pythae.

    pip install -e '.[bench]'          # Pyro and pythae (optional: skipped when absent)
    python benchmarks/throughput.py --data-dir ../shared/data --rounds 5   # --device cuda on a GPU

The workload is ``--epochs`` epochs (default 3) of the 784-200-200-50 Bernoulli MLP VAE
(tanh, diagonal Gaussian encoder, ELBO with the analytic KL, one sample, Adam at 1e-3,
batch 100) over the first ``--train-points`` training images of binarized MNIST, with its
whole validation split (10,000 images) as a user has it. The contenders run in one
process, one thread, after a warm-up call each, alternating (the order rotates every
round); the table gives medians with the spread (min-max), ratios to the fused-Adam hand
loop, and each contender's CPU time over wall time (below 1: the machine was contended).

Every contender but pythae does the same validation work, what our trainer does at its
defaults: after each epoch the ELBO of a fixed subset of 1,000 validation images, 10
samples each, and once at the end the whole split's:

- ``amortized``: one call of :func:`amortized.train` at its defaults (also its data check
  and set-up, latent diagnostics on 1,000 validation images and a checkpoint every epoch:
  work the others do not do);
- ``hand loop, fused Adam``: the same model and update in a dozen lines of PyTorch, with
  ``torch.optim.Adam(fused=True)`` (what our trainer uses): the reference;
- ``hand loop, Adam``: the same with the default (for-each) Adam;
- ``pyro, defaults``: ``pyro.infer.SVI`` with ``TraceMeanField_ELBO`` (analytic KL), an
  amortized guide, ``pyro.plate`` over the minibatch, ``pyro.optim.Adam``;
- ``pyro, tuned``: the same model and guide with distribution checks off
  (``pyro.enable_validation(False)``), ``differentiable_loss`` and a fused torch Adam;
- ``pythae``: one ``train()`` of pythae's ``BaseTrainer`` on its ``VAE`` (BCE on sigmoid
  outputs, the same networks), no evaluation set, its final save included and the
  trainer's construction not timed.

Achieved FLOP/s counts the matrix products of the training steps' forward and backward
passes (3 times the forward's 2 * multiply-adds; validation not counted) and is compared
with this machine's measured peak, a float32 2048 x 2048 matrix product on the same
number of threads; on a CPU both are read per CPU second (``peak.clock``), so a job
sharing the cores does not lower them, and the CPU time over wall time is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from peak import peak_flops, sync

from amortized.config import TrainConfig
from amortized.data import Dataset, load_dataset
from amortized.nets.layers import mlp
from amortized.train import evaluation_subset, train

LATENT, HIDDEN, DATA = 50, (200, 200), 784
VALID_POINTS, VALID_SAMPLES = 1000, 10  # our trainer's defaults


def flops_per_image() -> float:
    """Forward + backward matrix-product FLOPs of one image (3 x forward)."""
    enc = [DATA, *HIDDEN, 2 * LATENT]
    dec = [LATENT, *HIDDEN, DATA]
    macs = sum(a * b for net in (enc, dec) for a, b in zip(net[:-1], net[1:], strict=True))
    return 3 * 2 * macs


def ours(data: Dataset, epochs: int, device: torch.device) -> float:
    config = TrainConfig(epochs=epochs, progress=False, seed=0, device=str(device))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(config, Path(tmp), dataset=data)
        sync(device)
        return time.perf_counter() - start


def _elbo(encoder, decoder, x: torch.Tensor, samples: int) -> torch.Tensor:
    """The ELBO (analytic KL) of each row of x, ``samples`` draws: the hand loops' formula."""
    mu, log_sigma = encoder(x).chunk(2, dim=-1)
    z = mu + log_sigma.exp() * torch.randn(samples, *mu.shape, device=x.device)
    logits = decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)  # fmt: skip
    kl = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1)
    return log_lik - kl


def _validate(encoder, decoder, x: torch.Tensor) -> float:
    """Mean validation ELBO in blocks of 100 images, as our trainer scores it."""
    with torch.no_grad():
        return float(torch.cat([_elbo(encoder, decoder, b, VALID_SAMPLES)
                                for b in x.split(100)]).mean())  # fmt: skip


def _epochs(x: torch.Tensor, epochs: int, step: Callable[[torch.Tensor], None],
            validate: Callable[[torch.Tensor], float], valid: torch.Tensor) -> None:
    """Shuffled minibatches of 100 for ``epochs`` epochs, each followed by the validation
    of the fixed subset, then the whole split once, keeping the best epoch's weights."""
    subset, best = evaluation_subset(valid, VALID_POINTS), -float("inf")
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], device=x.device).split(100):
            step(x[idx])
        best = max(best, validate(subset))  # a copy of the weights would follow: not timed
    validate(valid)


def hand_loop(x: torch.Tensor, valid: torch.Tensor, epochs: int, fused: bool) -> float:
    torch.manual_seed(0)
    encoder = mlp(DATA, HIDDEN, 2 * LATENT, "tanh").to(x.device)
    decoder = mlp(LATENT, HIDDEN, DATA, "tanh").to(x.device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused or None)

    def step(xb):
        loss = -_elbo(encoder, decoder, xb, 1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync(x.device)
    start = time.perf_counter()
    _epochs(x, epochs, step, lambda v: _validate(encoder, decoder, v), valid)
    sync(x.device)
    return time.perf_counter() - start


def pyro_svi(x: torch.Tensor, valid: torch.Tensor, epochs: int, tuned: bool) -> float:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceMeanField_ELBO

    pyro.clear_param_store()
    pyro.enable_validation(not tuned)
    torch.manual_seed(0)
    encoder = mlp(DATA, HIDDEN, 2 * LATENT, "tanh").to(x.device)
    decoder = mlp(LATENT, HIDDEN, DATA, "tanh").to(x.device)

    def model(xb):
        pyro.module("decoder", decoder)
        with pyro.plate("data", xb.shape[0]):
            prior = dist.Normal(xb.new_zeros(LATENT), xb.new_ones(LATENT)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=xb)

    def guide(xb):
        pyro.module("encoder", encoder)
        with pyro.plate("data", xb.shape[0]):
            mu, log_sigma = encoder(xb).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))

    if tuned:  # Pyro's loss as a tensor, stepped by a fused torch Adam
        loss_fn = TraceMeanField_ELBO().differentiable_loss
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3,
                                     fused=True)  # fmt: skip

        def step(xb):
            loss = loss_fn(model, guide, xb) / xb.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=TraceMeanField_ELBO())

        def step(xb):
            svi.step(xb)

    sync(x.device)
    start = time.perf_counter()
    try:
        _epochs(x, epochs, step, lambda v: _validate(encoder, decoder, v), valid)
    finally:
        pyro.enable_validation(True)
    sync(x.device)
    return time.perf_counter() - start


def pythae_trainer(x: torch.Tensor, epochs: int) -> float:
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = mlp(DATA, HIDDEN, 2 * LATENT, "tanh")

        def forward(self, xb):
            mu, log_sigma = self.net(xb).chunk(2, dim=-1)
            return ModelOutput(embedding=mu, log_covariance=2 * log_sigma)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = mlp(LATENT, HIDDEN, DATA, "tanh")

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    torch.manual_seed(0)
    config = VAEConfig(input_dim=(DATA,), latent_dim=LATENT, reconstruction_loss="bce")
    model = VAE(config, encoder=Encoder(), decoder=Decoder())
    with tempfile.TemporaryDirectory() as tmp:
        training = BaseTrainerConfig(
            output_dir=tmp, num_epochs=epochs, per_device_train_batch_size=100,
            learning_rate=1e-3, optimizer_cls="Adam", no_cuda=x.device.type != "cuda",
        )  # fmt: skip
        dataset = BaseDataset(x.cpu(), torch.zeros(len(x)))  # its DataLoader moves batches
        trainer = BaseTrainer(model, dataset, training_config=training)
        start = time.perf_counter()
        logging.disable(logging.INFO)  # its banners; the progress bars go to a buffer
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                trainer.train()
            sync(x.device)
        finally:
            logging.disable(logging.NOTSET)
        return time.perf_counter() - start


def _timed(run: Callable[[], float]) -> tuple[float, float]:
    """Wall seconds of ``run`` and its CPU seconds over them (this process)."""
    cpu = time.process_time()
    wall = run()
    return wall, (time.process_time() - cpu) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--train-points", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per timed call")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    full = load_dataset("binarized-mnist", args.data_dir)
    x = full.train[: args.train_points]
    data = Dataset("bench", x, full.valid, full.test[:100], "static", (28, 28))
    e = args.epochs
    x, valid = x.to(device), full.valid.to(device)  # the data live on the device, as ours
    contenders = {
        "amortized": lambda: ours(data, e, device),
        "hand loop, fused Adam": lambda: hand_loop(x, valid, e, fused=True),
        "hand loop, Adam": lambda: hand_loop(x, valid, e, fused=False),
    }
    try:
        import pyro  # noqa: F401

        contenders["pyro, defaults"] = lambda: pyro_svi(x, valid, e, tuned=False)
        contenders["pyro, tuned"] = lambda: pyro_svi(x, valid, e, tuned=True)
    except ImportError:
        print("pyro not installed (pip install -e '.[bench]'): left out")
    try:
        import pythae  # noqa: F401

        contenders["pythae"] = lambda: pythae_trainer(x, e)
    except ImportError:
        print("pythae not installed (pip install -e '.[bench]'): left out")
    load_before = os.getloadavg()
    for run in contenders.values():  # warm-up: first calls pay for imports and allocations
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    busy: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = _timed(contenders[name])
            times[name].append(wall)
            busy[name].append(cpu)
    peak = peak_flops(device)
    flops = flops_per_image() * len(x) * e
    reference = statistics.median(times["hand loop, fused Adam"])
    print(f"{len(x)} images per epoch, {e} epochs per call, {args.rounds} alternating rounds, "
          f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after on "
          f"{os.cpu_count()} cores")  # fmt: skip
    print("\n| trainer | epoch s (median, min-max) | images/s | vs fused hand loop | "
          "GFLOP/s | of peak | CPU / wall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        cpu_share = statistics.median(busy[name]) if device.type == "cpu" else 1.0
        achieved = flops / (med * cpu_share)  # per CPU second on a CPU, as the peak
        print(f"| {name} | {med / e:.2f} ({min(ts) / e:.2f}-{max(ts) / e:.2f}) | "
              f"{len(x) * e / med:.0f} | {reference / med:.2f}x | {achieved / 1e9:.1f} | "
              f"{achieved / peak:.1%} | {statistics.median(busy[name]):.2f} |")  # fmt: skip
    ratios = sorted(r / o for r, o in zip(times["hand loop, fused Adam"], times["amortized"],
                                          strict=True))  # fmt: skip
    print(f"\namortized / fused hand loop, per round: {', '.join(f'{r:.2f}x' for r in ratios)}")


if __name__ == "__main__":
    main()
