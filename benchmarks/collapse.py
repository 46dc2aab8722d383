"""Posterior collapse on binarized MNIST: an autoregressive-decoder VAE with and without
remedies, and a VQ-VAE, in one table.

    python benchmarks/collapse.py --decoder made --train-points 0 --epochs 40 \
        --data-dir ../shared/data --out runs/collapse-made        # about 2 h on one core
    python benchmarks/collapse.py --data-dir ../shared/data --out runs/collapse  # PixelCNN

Every VAE has the same MLP encoder (784-200-200-2x32, diagonal Gaussian) and the same
autoregressive decoder conditioned on z (``--decoder``: a gated PixelCNN, or MADE, a
masked MLP that a CPU trains on all 50,000 images in minutes); they differ only in how
they are trained:

- ``plain``: the ELBO from the first step (no KL warm-up), the setting that collapses;
- ``kl-annealing``: the KL weight rises along a sigmoid over the first epochs;
- ``free-bits``: a KL floor per latent dimension (Kingma et al. 2016);
- ``aggressive``: encoder-only steps before each decoder step while I(x; z) rises
  (He et al. 2019);
- ``savae``: semi-amortized training (Kim et al. 2018), for ``--savae-epochs`` epochs. Its
  row measures the encoder's q, before the refinement steps it was trained through;
- ``decoder-alone``: the same decoder with z cut off (``decoder_uses_z = false``), trained
  like ``plain``: the fully collapsed model, whose NLL is what the latent code is measured
  against.

The VQ-VAE (MLP encoder and decoder, M codes from a K-entry codebook) is scored by its
bound under a uniform code prior and under a GRU prior fitted to its training codes.

Measured on a random test subset: an IWAE-k estimate of the NLL, the ELBO, the KL, the
active units, I(x; z), and for the VQ-VAE the codebook perplexity; KL per dimension over
training is plotted for every VAE. Each run is resumable (run the command again after a
kill); finished runs are not retrained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from amortized.config import TrainConfig
from amortized.data import Dataset, load_dataset
from amortized.diagnostics import latent_diagnostics
from amortized.estimators import elbo, iwae_bound
from amortized.plots import plot_images, plot_latent_use
from amortized.train import evaluation_subset, read_metrics, train
from amortized.vqvae import VQVAE, CodePrior, codebook_perplexity, fit

REMEDIES = {
    "plain": {"warmup_epochs": 0.0},
    "kl-annealing": {"warmup_epochs": 10.0, "kl_schedule": "sigmoid"},
    "free-bits": {"warmup_epochs": 0.0, "free_bits": 0.25, "free_bits_mode": "dimension"},
    "aggressive": {"warmup_epochs": 0.0, "aggressive": True},
    # Kim et al. (2018): 5 momentum-SGD steps from the encoder's output, trained through;
    # about 15x the cost of a plain step, so it gets --savae-epochs
    "savae": {
        "warmup_epochs": 0.0,
        "inference": "savae",
        "svi_steps": 5,
        "svi_method": "sgd",
        "svi_lr": 0.01,
    },
    # the reference: the same decoder with z cut off, collapsed by construction
    "decoder-alone": {"warmup_epochs": 0.0, "decoder_uses_z": False},
}

DECODER_NAMES = {"pixelcnn": "PixelCNN", "made": "MADE"}


def subset(data: Dataset, train: int, valid: int) -> Dataset:
    """Random training and validation subsets (the PixelCNN is costly on a CPU)."""
    train_x, valid_x = evaluation_subset(data.train, train), evaluation_subset(data.valid, valid)
    return Dataset(data.name, train_x, valid_x, data.test, data.binarization, data.image_shape)


def score_vae(trained, x, k: int, batch: int = 10) -> dict:
    """IWAE-k NLL, ELBO and the latent code's use on x."""
    model, encoder, family = trained.model, trained.encoder, trained.family
    iwae, bound = [], []
    with torch.no_grad():
        lam = encoder(x)
        for i in range(0, len(x), batch):
            xb, lb = x[i : i + batch], lam[i : i + batch]
            iwae.append(iwae_bound(model, family, lb, xb, k))
            bound.append(elbo(model, family, lb, xb, 10))
    diag = latent_diagnostics(family, lam, model.prior)
    return {
        "nll_iwae": -float(torch.cat(iwae).mean()),
        "elbo": float(torch.cat(bound).mean()),
        "kl": diag.kl,
        "active_units": diag.active_units,
        "mutual_information": diag.mutual_information,
    }


def run_vqvae(data: Dataset, x_test, args, out: Path) -> dict:
    torch.manual_seed(0)
    vq = VQVAE(784, latents=args.vq_latents, code_dim=args.vq_code_dim,
               codebook_size=args.vq_codebook)  # fmt: skip
    valid = data.valid

    def vq_score():
        with torch.no_grad():
            perplexity = codebook_perplexity(vq.codes(valid), args.vq_codebook)[0]
            return {"valid_bound_uniform": float(vq.bound(valid).mean()), "perplexity": perplexity}

    log = fit(vq, vq.loss, data.train, vq_score, out / "vqvae", epochs=args.epochs)
    with torch.no_grad():
        train_codes = torch.cat([vq.codes(xb) for xb in data.train.split(1000)])
    prior = CodePrior(args.vq_codebook, args.vq_latents)

    def prior_loss(codes):
        return -prior.log_prob(codes).mean()

    def prior_score():
        with torch.no_grad():
            return {"valid_bound_prior": float(vq.bound(valid, prior).mean())}

    log += fit(prior, prior_loss, train_codes, prior_score, out / "vqvae-prior",
               epochs=args.prior_epochs)  # fmt: skip
    seconds = sum(m["seconds"] for m in log)  # training, resumed runs included
    shown = torch.linspace(0, len(x_test) - 1, 10).long()  # the test split is sorted by digit
    with torch.no_grad():
        codes = vq.codes(x_test)
        perplexity, used = codebook_perplexity(codes, args.vq_codebook)
        uniform, learned = vq.bound(x_test), vq.bound(x_test, prior)
        recon = torch.sigmoid(vq.decode(codes[shown]).base_dist.logits)
        samples = torch.sigmoid(vq.decode(prior.sample(10)).base_dist.logits)
    plot_images(
        {"test data": x_test[shown].numpy(), "VQ-VAE reconstruction (mean)": recon.numpy(),
         "samples (codes from the learned prior)": samples.numpy()},
        (28, 28), out / "vqvae_images.png",
    )  # fmt: skip
    return {
        "nll_uniform_prior": -float(uniform.mean()),
        "nll_learned_prior": -float(learned.mean()),
        "perplexity": perplexity,
        "codes_used": used,
        "codebook_size": args.vq_codebook,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/collapse")
    ap.add_argument("--train-points", type=int, default=10000, help="training subset (0: all)")
    ap.add_argument("--valid-points", type=int, default=1000, help="validation subset (0: all)")
    ap.add_argument("--test-points", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iwae-k", type=int, default=100)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--decoder", default="pixelcnn", choices=["pixelcnn", "made"])
    ap.add_argument("--made-hidden", default="500", help="hidden sizes of the made decoder")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--remedies", default=",".join(REMEDIES), help="comma-separated subset")
    ap.add_argument("--savae-epochs", type=int, default=10)
    ap.add_argument("--vq-latents", type=int, default=16)
    ap.add_argument("--vq-code-dim", type=int, default=16)
    ap.add_argument("--vq-codebook", type=int, default=64)
    ap.add_argument("--prior-epochs", type=int, default=20)
    ap.add_argument("--skip-vqvae", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("binarized-mnist", args.data_dir)
    data = subset(data, args.train_points, args.valid_points)
    x_test = evaluation_subset(data.test, args.test_points)

    results = {}
    for name in args.remedies.split(","):
        epochs = args.savae_epochs if name == "savae" else args.epochs
        config = TrainConfig(
            dataset="binarized-mnist", latent_dim=args.latent_dim, decoder=args.decoder,
            made_hidden=tuple(int(h) for h in args.made_hidden.split(",")),
            pixelcnn_channels=args.channels, pixelcnn_layers=args.layers,
            pixelcnn_kernel=args.kernel, epochs=epochs, patience=epochs,
            valid_samples=1, progress=False, **REMEDIES[name],
        )  # fmt: skip
        start = time.perf_counter()
        trained = train(config, out / name, dataset=data)
        metrics = read_metrics(out / name)
        plot_latent_use(metrics, out / f"{name}_latent_use.png")
        torch.manual_seed(0)
        results[name] = score_vae(trained, x_test, args.iwae_k) | {
            "seconds": sum(m["seconds"] for m in metrics),
            "scored_in": time.perf_counter() - start,
        }
        print(name, json.dumps(results[name]), flush=True)
    if not args.skip_vqvae:
        results["vq-vae"] = run_vqvae(data, x_test, args, out)
        print("vq-vae", json.dumps(results["vq-vae"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    lines = [
        f"binarized MNIST, {len(data.train)} training images, {args.epochs} epochs "
        f"(SA-VAE {args.savae_epochs}); "
        f"{len(x_test)} random test images; NLL by IWAE-{args.iwae_k} (VAEs) or the VQ-VAE's "
        "bound; KL, active units and I(x; z) of the encoder's q on the same images.",
        "",
        "| model | NLL | ELBO | KL | active units | I(x; z) | codebook perplexity | training s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "vq-vae":
            lines.append(
                f"| VQ-VAE, uniform prior / learned prior | {r['nll_uniform_prior']:.2f} / "
                f"{r['nll_learned_prior']:.2f} | | | | | {r['perplexity']:.1f} of "
                f"{r['codebook_size']} ({r['codes_used']} used) | {r['seconds']:.0f} |"
            )
        else:
            label = "alone (z cut off)" if name == "decoder-alone" else f"VAE, {name}"
            lines.append(
                f"| {DECODER_NAMES[args.decoder]} {label} | {r['nll_iwae']:.2f} "
                f"| {r['elbo']:.2f} | {r['kl']:.2f} "
                f"| {r['active_units']} of {args.latent_dim} | {r['mutual_information']:.2f} "
                f"| | {r['seconds']:.0f} |"
            )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
