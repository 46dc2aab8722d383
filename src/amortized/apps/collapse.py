r"""The posterior-collapse study: does the latent code survive a decoder that can do without it?

One autoregressive decoder conditioned on z (a MADE or a gated PixelCNN) and one MLP
encoder, trained several ways on the same data (:data:`REMEDIES`):

- ``plain``: the ELBO from the first step (no KL warm-up), the setting that collapses;
- ``kl-annealing``: the KL weight rises along a sigmoid over the first 10 epochs;
- ``free-bits``: a floor of 0.25 nats of KL per latent dimension (Kingma et al. 2016);
- ``aggressive``: encoder-only steps before each decoder step while I(x; z) rises
  (He et al. 2019);
- ``savae``: semi-amortized training (Kim et al. 2018), for ``savae_epochs`` epochs; its
  row measures the encoder's q, before the refinement steps it was trained through;
- ``decoder-alone``: the same decoder with z cut off, collapsed by construction: its NLL is
  what the latent code is measured against.

A VQ-VAE (MLP encoder and decoder, discrete codes) sits in the same table, scored by its
bound under a uniform code prior and under a GRU prior fitted to its training codes.

Every model is scored on the same random test images: an IWAE-k estimate of the NLL, the
ELBO, the KL, active units and I(x; z) of the encoder's q, and the VQ-VAE's codebook
perplexity. :func:`run_collapse_study` writes ``report.md`` (the table, the KL per
dimension over training of every VAE, the VQ-VAE's reconstructions), ``results.json`` and
one run directory per model; rerun it after a kill and finished runs are only rescored.
"""

from __future__ import annotations

import json
import time
import typing
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import (
    REMEDY_FIELDS,
    REMEDY_NAMES,
    CollapseConfig,
    CollapseDecoder,
    ConfigError,
    TrainConfig,
    check_fields,
    save_config,
    to_dict,
)
from ..data import Dataset, load_dataset
from ..estimators import elbo, iwae_bound
from ..files import lock_directory, write_atomic
from ..measure.diagnostics import collapse_warning, latent_diagnostics
from ..nets.vqvae import VQVAE, CodePrior, codebook_perplexity
from ..train import Trained, evaluation_subset, prepare_split, read_metrics, train
from ..train import validate as validate_training
from ..train.fit import fit
from .plots import plot_images, plot_latent_use

__all__ = ["REMEDIES", "run_collapse_study", "score_vae"]

#: The training settings of each row; everything else is shared.
REMEDIES: dict[str, dict] = {
    "plain": {"warmup_epochs": 0.0},
    "kl-annealing": {"warmup_epochs": 10.0, "kl_schedule": "sigmoid"},
    "free-bits": {"warmup_epochs": 0.0, "free_bits": 0.25, "free_bits_mode": "dimension"},
    "aggressive": {"warmup_epochs": 0.0, "aggressive": True},
    # Kim et al. (2018): 5 momentum-SGD steps from the encoder's output, trained through
    "savae": {
        "warmup_epochs": 0.0,
        "inference": "savae",
        "svi_steps": 5,
        "svi_method": "sgd",
        "svi_lr": 0.01,
    },
    "decoder-alone": {"warmup_epochs": 0.0, "decoder_uses_z": False},
}
assert tuple(REMEDIES) == REMEDY_NAMES
assert {k for settings in REMEDIES.values() for k in settings} <= set(REMEDY_FIELDS)

DECODER_NAMES = {"pixelcnn": "PixelCNN", "made": "MADE"}


def validate(config: CollapseConfig) -> None:
    """Reject settings that cannot work, with one line naming the field."""
    check_fields(config)  # every setting's choices and bounds (config.py)
    unknown = sorted(set(config.remedies) - set(REMEDIES))
    owned = [name for name in REMEDY_FIELDS
             if getattr(config.train, name) != getattr(TrainConfig(), name)]  # fmt: skip
    decoders = typing.get_args(CollapseDecoder)
    checks = [
        (not unknown, f"remedies: unknown {unknown}; choose from {','.join(REMEDIES)}"),
        (config.remedies or config.vqvae, "remedies is empty and vqvae is off: nothing to run"),
        (config.train.decoder in decoders, f"train.decoder must be one of {decoders}"),
        (config.train.epochs >= 1, "train.epochs must be >= 1"),
        (not owned, f"train.{owned[0] if owned else ''} is set by each remedy of the study "
                    "for its own row: leave it out"),  # fmt: skip
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name in config.remedies:  # every row's training settings, before anything is written
        validate_training(train_config(config, name))


def train_config(config: CollapseConfig, remedy: str) -> TrainConfig:
    """The TrainConfig of one row: the shared settings, the remedy's own on top."""
    epochs = config.savae_epochs if remedy == "savae" else config.train.epochs
    return replace(config.train, epochs=epochs, patience=epochs, **REMEDIES[remedy])


def score_vae(trained: Trained, x: Tensor, k: int, batch: int = 10) -> dict:
    """IWAE-k NLL, 10-sample ELBO and the latent code's use (KL, active units, I(x; z)) of
    the encoder's q on x."""
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
        "kl_per_dim": diag.kl_per_dim,
        "active_units": diag.active_units,
        "mutual_information": diag.mutual_information,
        "collapsed": collapse_warning(diag) is not None,
    }


def _vqvae(config: CollapseConfig, data: Dataset, x_test: Tensor, out: Path) -> dict:
    """Train (or resume) the VQ-VAE and its code prior; score them on x_test."""
    shared = config.train
    device = torch.device(shared.device)
    torch.manual_seed(shared.seed)
    vq = VQVAE(
        x_test.shape[1], latents=config.vq_latents, code_dim=config.vq_code_dim,
        codebook_size=config.vq_codebook,
    ).to(device)  # fmt: skip
    train_x = prepare_split(data, "train", "bernoulli", shared.seed).to(device)
    valid_x = prepare_split(data, "valid", "bernoulli", shared.seed).to(device)

    def vq_score() -> dict:
        with torch.no_grad():
            bound = float(vq.bound(valid_x).mean())
            perplexity = codebook_perplexity(vq.codes(valid_x), config.vq_codebook)[0]
            return {"valid_bound_uniform": bound, "perplexity": perplexity}

    log = fit(vq, vq.loss, train_x, vq_score, out / "vqvae", epochs=shared.epochs, seed=shared.seed)
    with torch.no_grad():
        train_codes = torch.cat([vq.codes(xb) for xb in train_x.split(1000)])
    prior = CodePrior(config.vq_codebook, config.vq_latents).to(device)

    def prior_loss(codes: Tensor) -> Tensor:
        return -prior.log_prob(codes).mean()

    def prior_score() -> dict:
        with torch.no_grad():
            return {"valid_bound_prior": float(vq.bound(valid_x, prior).mean())}

    log += fit(prior, prior_loss, train_codes, prior_score, out / "vqvae-prior",
               epochs=config.prior_epochs, seed=shared.seed)  # fmt: skip
    shown = torch.linspace(0, len(x_test) - 1, min(10, len(x_test))).long()  # spread out
    with torch.no_grad():
        codes = vq.codes(x_test)
        perplexity, used = codebook_perplexity(codes, config.vq_codebook)
        uniform, learned = vq.bound(x_test), vq.bound(x_test, prior)
        recon = torch.sigmoid(vq.decode(codes[shown]).base_dist.logits)
        samples = torch.sigmoid(vq.decode(prior.sample(len(shown))).base_dist.logits)
    if data.image_shape is not None:
        plot_images(
            {"test data": x_test[shown].cpu().numpy(),
             "VQ-VAE reconstruction (mean)": recon.cpu().numpy(),
             "samples (codes from the learned prior)": samples.cpu().numpy()},
            data.image_shape, out / "vqvae_images.png",
        )  # fmt: skip
    return {
        "nll_uniform_prior": -float(uniform.mean()),
        "nll_learned_prior": -float(learned.mean()),
        "perplexity": perplexity,
        "codes_used": used,
        "codebook_size": config.vq_codebook,
        "seconds": sum(m["seconds"] for m in log),  # training, resumed runs included
    }


def run_collapse_study(
    config: CollapseConfig, run_dir: str | Path, dataset: Dataset | None = None
) -> dict:
    """Train (or resume) every model of the study in ``run_dir``, score them on the same
    test images, and write ``report.md``, ``results.json`` and the figures there."""
    validate(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_directory(run_dir):  # each row's training holds its own directory too
        return _collapse_in(config, run_dir, dataset)


def _collapse_in(config: CollapseConfig, run_dir: Path, dataset: Dataset | None) -> dict:
    save_config(config, run_dir / "config.toml")
    start = time.perf_counter()
    shared = config.train
    data = dataset or load_dataset(shared.dataset, shared.data_dir or None)
    data = replace(
        data,
        train=evaluation_subset(data.train, config.train_points, shared.seed),
        valid=evaluation_subset(data.valid, config.valid_points, shared.seed),
    )
    x_test = prepare_split(data, "test", "bernoulli", shared.seed)
    x_test = evaluation_subset(x_test, config.test_points, shared.seed).to(shared.device)

    rows: dict[str, dict] = {}
    for name in config.remedies:
        trained = train(train_config(config, name), run_dir / name, dataset=data)
        metrics = read_metrics(run_dir / name)
        if metrics and "kl_per_dim" in metrics[-1]:
            plot_latent_use(metrics, run_dir / f"{name}_latent_use.png")
        torch.manual_seed(shared.seed)
        rows[name] = score_vae(trained, x_test, config.iwae_k) | {
            "epochs": len(metrics),
            "seconds": sum(m["seconds"] for m in metrics),
        }
    if config.vqvae:
        rows["vq-vae"] = _vqvae(config, data, x_test, run_dir)

    results = {
        "config": to_dict(config),
        "data": {"train": len(data.train), "valid": len(data.valid), "test": len(x_test)},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    write_atomic(run_dir / "report.md", _report(config, data.name, results))
    return results


def _report(config: CollapseConfig, name: str, results: dict) -> str:
    rows, data = results["rows"], results["data"]
    decoder = DECODER_NAMES[config.train.decoder]
    shared = config.train
    lines = [
        f"# Posterior collapse: a {decoder} decoder on {name}",
        "",
        f"{data['train']} training images, {shared.epochs} epochs"
        + (f" (SA-VAE {config.savae_epochs})" if "savae" in rows else "")
        + f", batch {shared.batch_size}, Adam {shared.lr:g}"
        + ("" if shared.lr_schedule == "constant" else f" ({shared.lr_schedule} schedule)")
        + "; "
        f"{data['test']} random test images. "
        f"NLL: IWAE-{config.iwae_k} from the encoder's q (VAEs) or the VQ-VAE's bound. KL, "
        "active units (Var_x E_q[z_u] > 0.01) and I(x; z): the encoder's q on the same "
        "images. Collapsed: no active unit, or under 1 nat of KL.",
        "",
        "| model | NLL | ELBO | KL | active units | I(x; z) | collapsed | codebook perplexity "
        "| training s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if name == "vq-vae":
            lines.append(
                f"| VQ-VAE, uniform prior / learned prior | {r['nll_uniform_prior']:.2f} / "
                f"{r['nll_learned_prior']:.2f} | | | | | | {r['perplexity']:.1f} of "
                f"{r['codebook_size']} ({r['codes_used']} used) | {r['seconds']:.0f} |"
            )
            continue
        alone = name == "decoder-alone"
        label = f"{decoder} alone (z cut off)" if alone else f"{decoder} VAE, {name}"
        lines.append(
            f"| {label} | {r['nll_iwae']:.2f} | {r['elbo']:.2f} | {r['kl']:.2f} "
            f"| {r['active_units']} of {shared.latent_dim} | {r['mutual_information']:.2f} "
            f"| {'yes' if r['collapsed'] else 'no'} | | {r['seconds']:.0f} |"
        )
    if "decoder-alone" in rows:
        alone = rows["decoder-alone"]["nll_iwae"]
        lines += ["", f"What the latent code buys (NLL of the decoder alone, {alone:.2f}, minus "
                  "each VAE's):", ""]  # fmt: skip
        for name, r in rows.items():
            if name not in ("decoder-alone", "vq-vae"):
                lines.append(f"- {name}: {alone - r['nll_iwae']:+.2f} nats")
    figures = [name for name in rows if name != "vq-vae"]
    if figures:
        lines += ["", "## KL per latent dimension over training", ""]
        lines += [f"![{name}]({name}_latent_use.png)" for name in figures]
    if "vq-vae" in rows:
        lines += ["", "## VQ-VAE reconstructions", "", "![VQ-VAE](vqvae_images.png)"]
    seconds = results["seconds"]
    lines += ["", f"Study wall time {seconds:.0f} s (a rerun only rescores finished runs)."]
    return "\n".join(lines) + "\n"
