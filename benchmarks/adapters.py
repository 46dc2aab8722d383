"""The adapters on trained models: our ELBO and IWAE against pythae's and Pyro's own.

Trains a pythae VAE with pythae's own trainer and Pyro's tutorial VAE with Pyro's SVI on
mnist5k (binarized once, fixed), then scores both, on the same test images, with each
library's estimator and with ours through `amortized.adapters`, and prints the gap report
of each:

    python benchmarks/adapters.py --epochs 20 --points 500

Agreement is judged by the difference in units of its standard error (both estimates are
Monte Carlo means on the same images, drawn independently: their errors add).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from amortized import elbo, gap_report, iwae_bound
from amortized.adapters import from_pyro, from_pythae
from amortized.data import load_dataset
from amortized.train import evaluation_subset, prepare_split


def train_pythae(x: torch.Tensor, epochs: int):
    from pythae.models import VAE, VAEConfig
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=16, reconstruction_loss="bce"))
    with tempfile.TemporaryDirectory() as out:
        config = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=1e-3,
                                   per_device_train_batch_size=100, no_cuda=True)  # fmt: skip
        TrainingPipeline(training_config=config, model=model)(
            train_data=x.view(-1, 1, 28, 28).numpy(), eval_data=None)  # fmt: skip
    return model.eval()


def train_pyro(x: torch.Tensor, epochs: int):
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    path = Path(__file__).resolve().parents[1] / "examples" / "pyro_vae.py"
    spec = importlib.util.spec_from_file_location("pyro_vae", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # Pyro's tutorial VAE, as examples/pyro_vae.py has it
    pyro.clear_param_store()
    vae = example.VAE(x.shape[1])
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    for _ in range(epochs):
        for batch in x[torch.randperm(len(x))].split(100):
            svi.step(batch)
    return vae


def pythae_rows(vae, x: torch.Tensor, k: int) -> dict[str, tuple[float, float]]:
    """pythae's own estimates: its loss (one draw per image, repeated) and get_nll."""
    images = x.view(-1, 1, 28, 28)
    with torch.no_grad():
        losses = torch.stack([vae({"data": images}).loss for _ in range(200)])
        runs = [vae.get_nll(images, n_samples=k, batch_size=k) for _ in range(10)]
    return {"ELBO": (-losses.mean().item(), losses.std().item() / math.sqrt(len(losses))),
            f"IWAE-{k}": (float(np.mean(runs)), float(np.std(runs, ddof=1)) / len(runs) ** 0.5)}


def pyro_rows(vae, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    import pyro

    loss = pyro.infer.Trace_ELBO(num_particles=100, vectorize_particles=True,
                                 max_plate_nesting=1)  # fmt: skip
    with torch.no_grad():
        runs = torch.tensor([-loss.loss(vae.model, vae.guide, x) / len(x) for _ in range(10)])
    return {"ELBO": (runs.mean().item(), runs.std().item() / math.sqrt(len(runs)))}


def ours(model, encoder, family, x, k: int) -> dict[str, tuple[float, float]]:
    with torch.no_grad():
        lam = encoder(x)
        value, se = elbo(model, family, lam, x, samples=1000, stderr=True)
        bound, bound_se = iwae_bound(model, family, lam, x, k=k, stderr=True)
    n = len(x)
    return {"ELBO": (value.mean().item(), se.square().sum().sqrt().item() / n),
            f"IWAE-{k}": (bound.mean().item(), bound_se.square().sum().sqrt().item() / n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--points", type=int, default=500, help="test images scored")
    parser.add_argument("--iwae-k", type=int, default=1000)
    args = parser.parse_args()
    logging.getLogger("pythae").setLevel(logging.WARNING)  # its trainer's progress lines
    torch.manual_seed(0)
    data = load_dataset("mnist5k")
    train_x = prepare_split(data, "train", "bernoulli")
    test_x = evaluation_subset(prepare_split(data, "test", "bernoulli"), args.points)
    print(f"threads {torch.get_num_threads()}; {len(train_x)} training images, "
          f"{len(test_x)} test images, {args.epochs} epochs each")  # fmt: skip

    for name, fit, theirs, adapt in (
        ("pythae VAE", train_pythae, lambda v: pythae_rows(v, test_x, args.iwae_k), from_pythae),
        ("Pyro VAE", train_pyro, lambda v: pyro_rows(v, test_x),
         lambda v: from_pyro(v.model, v.guide, test_x.shape[1])),
    ):  # fmt: skip
        start = time.perf_counter()
        vae = fit(train_x, args.epochs)
        trained = time.perf_counter() - start
        model, encoder, family = adapt(vae)
        torch.manual_seed(1)
        mine, lib = ours(model, encoder, family, test_x, args.iwae_k), theirs(vae)
        print(f"\n{name} ({trained:.0f} s of training): nats per image, ± MC s.e.")
        print("| estimate | the library's | ours (adapter) | difference / s.e. |")
        print("|---|---|---|---|")
        for row, (value, se) in lib.items():
            m, m_se = mine[row]
            z = (m - value) / math.hypot(se, m_se)
            print(f"| {row} | {value:.3f} ± {se:.3f} | {m:.3f} ± {m_se:.3f} | {z:+.2f} |")
        torch.manual_seed(2)
        report = gap_report(model, test_x[:200], encoder, family, iwae_k=args.iwae_k,
                            elbo_samples=200, local_kwargs={"steps": 1000})  # fmt: skip
        print(f"\ngap report, first 200 of those images:\n{report.table()}")


if __name__ == "__main__":
    main()
