"""VAE training throughput: our trainer against a minimal hand-written loop, Pyro and pythae.

    pip install -e '.[bench]'          # Pyro and pythae (optional: skipped when absent)
    python benchmarks/throughput.py --data-dir ../shared/data --rounds 5   # --device cuda on a GPU

The workload is ``--epochs`` epochs (default 3) of the 784-200-200-50 Bernoulli MLP VAE
(tanh, diagonal Gaussian encoder, ELBO with the analytic KL, one sample, Adam, batch 100)
over the first ``--train-points`` training images of binarized MNIST. The three contenders run
in the same process after one warm-up call each, alternating (the order rotates every
round), and the table gives
medians with the spread (min-max) and ratios to the hand loop:

- ``amortized``: one call of :func:`amortized.train` (its data check and set-up once, its
  per-epoch validation on 100 images, latent diagnostics and checkpoint every epoch, as a
  user pays them);
- ``hand loop``: the same model and update in a dozen lines of PyTorch;
- ``pyro``: ``pyro.infer.SVI`` with ``TraceMeanField_ELBO`` (analytic KL), an amortized
  guide and ``pyro.plate`` over the minibatch;
- ``pythae``: one ``train()`` of pythae's ``BaseTrainer`` on its ``VAE`` (BCE reconstruction
  on sigmoid outputs, the same networks), no evaluation set, its final save included and
  the trainer's construction not timed.

Achieved FLOP/s counts the matrix products of the forward and backward passes (3 times
the forward's 2 * multiply-adds) and is compared with this machine's measured peak, a
float32 2048 x 2048 matrix product on the same number of threads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peak import peak_flops, sync

from amortized.config import TrainConfig
from amortized.data import Dataset, load_dataset
from amortized.nets.layers import mlp
from amortized.train import train

LATENT, HIDDEN, DATA = 50, (200, 200), 784


def flops_per_image() -> float:
    """Forward + backward matrix-product FLOPs of one image (3 x forward)."""
    enc = [DATA, *HIDDEN, 2 * LATENT]
    dec = [LATENT, *HIDDEN, DATA]
    macs = sum(a * b for net in (enc, dec) for a, b in zip(net[:-1], net[1:], strict=True))
    return 3 * 2 * macs


def ours(data: Dataset, epochs: int, device: torch.device) -> float:
    config = TrainConfig(
        epochs=epochs, progress=False, diagnostics_points=100, seed=0, device=str(device)
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(config, Path(tmp), dataset=data)
        sync(device)
        return time.perf_counter() - start


def hand_loop(x: torch.Tensor, epochs: int) -> float:
    torch.manual_seed(0)
    encoder = mlp(DATA, HIDDEN, 2 * LATENT, "tanh").to(x.device)
    decoder = mlp(LATENT, HIDDEN, DATA, "tanh").to(x.device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    sync(x.device)
    start = time.perf_counter()
    for idx in torch.cat(
        [torch.randperm(x.shape[0], device=x.device) for _ in range(epochs)]
    ).split(100):
        xb = x[idx]
        mu, log_sigma = encoder(xb).chunk(2, dim=-1)
        z = mu + log_sigma.exp() * torch.randn_like(mu)
        logits = decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(-1)
        kl = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1)
        loss = (kl - log_lik).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(x.device)
    return time.perf_counter() - start


def pyro_svi(x: torch.Tensor, epochs: int) -> float:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceMeanField_ELBO

    pyro.clear_param_store()
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

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=TraceMeanField_ELBO())
    sync(x.device)
    start = time.perf_counter()
    for idx in torch.cat(
        [torch.randperm(x.shape[0], device=x.device) for _ in range(epochs)]
    ).split(100):
        svi.step(x[idx])
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
    data = Dataset("bench", x, full.valid[:100], full.test[:100], "static", (28, 28))
    e = args.epochs
    x = x.to(device)  # the data lives on the device, as in our trainer
    contenders = {
        "amortized": lambda: ours(data, e, device),
        "hand loop": lambda: hand_loop(x, e),
    }
    try:
        import pyro  # noqa: F401

        contenders["pyro"] = lambda: pyro_svi(x, e)
    except ImportError:
        print("pyro not installed (pip install -e '.[bench]'): left out")
    try:
        import pythae  # noqa: F401

        contenders["pythae"] = lambda: pythae_trainer(x, e)
    except ImportError:
        print("pythae not installed (pip install -e '.[bench]'): left out")
    for run in contenders.values():  # warm-up: first calls pay for imports and allocations
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(contenders[name]())
    peak = peak_flops(device)
    flops = flops_per_image() * len(x) * e
    hand = statistics.median(times["hand loop"])
    print(f"{len(x)} images per epoch, {e} epochs per call, {args.rounds} alternating rounds, "
          f"device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print("\n| trainer | epoch s (median, min-max) | images/s | throughput vs hand loop | "
          "GFLOP/s | of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        achieved = flops / med
        print(f"| {name} | {med / e:.2f} ({min(ts) / e:.2f}-{max(ts) / e:.2f}) | "
              f"{len(x) * e / med:.0f} | "
              f"{hand / med:.2f}x | {achieved / 1e9:.1f} | {achieved / peak:.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
