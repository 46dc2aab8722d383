"""One command, one study: train a VAE, measure its inference gaps on training and
held-out data side by side, and write a report with tables and plots.

Outputs in the run directory: ``report.md``, ``results.json`` (every number of the
report, with the config), ``gaps_train.json`` and ``gaps_test.json`` (with per-datapoint
arrays) and the PNG figures the report shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, distributed
from ..config import GapConfig, StudyConfig, check_fields, to_dict
from ..data import load_dataset
from ..families import FAMILIES
from ..files import Stages, lock_directory, write_atomic
from ..measure.gaps import gap_report
from ..measure.report import GapReport
from ..train import Trained, evaluation_subset, prepare_split, read_metrics, train
from ..train import validate as validate_training
from .plots import (
    plot_bound_against_cost,
    plot_gap_bars,
    plot_gap_histograms,
    plot_gaps_over_training,
    plot_images,
    plot_latent_use,
    plot_training_curves,
)
from .study_report import report_markdown
from .usermodel import load_user_model

__all__ = ["run_study", "measure_gaps", "settings_key", "machine_summary"]

log = logging.getLogger(__name__)  # shown by the command line; silent in a library


def check_gap_config(gap: GapConfig) -> None:
    """Reject GapConfig values that cannot work, before anything expensive runs."""
    unknown = [f for f in gap.families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown family {unknown[0]!r}; choose from {sorted(FAMILIES)}")
    check_fields(gap)  # every setting's choices and bounds, declared beside it (config.py)


def measure_gaps(
    trained: Trained,
    x: torch.Tensor,
    gap: GapConfig,
    progress: bool,
    world: distributed.World | None = None,
) -> GapReport:
    """The gap report of a trained model on data x, as a GapConfig describes it.

    Its random draws come from ``gap.eval_seed`` block by block, so the report is the same
    on one process and shared among the processes of ``world``.
    """
    check_gap_config(gap)
    latent_dim = trained.config.latent_dim
    return gap_report(
        trained.model,
        x,
        trained.encoder,
        trained.family,
        families=[FAMILIES[name](latent_dim) for name in gap.families],
        iwae_k=gap.iwae_k,
        ais_steps=gap.ais_steps,
        ais_chains=gap.ais_chains,
        elbo_samples=gap.elbo_samples,
        local_kwargs={
            "steps": gap.local_steps,
            "lr": gap.local_lr,
            "samples": gap.local_samples,
            "batch_size": max(gap.eval_batch_size, 1000),
        },
        local_init=gap.local_init,
        refine_steps=gap.refine_steps,
        refine_kwargs={"lr": gap.refine_lr, "method": gap.refine_method},
        batch_size=gap.eval_batch_size,
        seed=gap.eval_seed,
        world=world,
        progress=progress,
    )


def run_study(config: StudyConfig, run_dir: str | Path, *, model: str | None = None,
              weights: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train (or resume), measure gaps on a training subset and the test split, report.

    With ``model`` (``module:function``, :mod:`amortized.apps.usermodel`), the user's own
    model, encoder and family (with ``weights`` loaded, if given) are measured instead: no
    training, and of ``config.train`` only the data settings apply.

    The run directory is held for the whole study (:func:`amortized.files.lock_directory`).
    Each gap report, once written, is a finished stage (``stages.json``): a rerun with the
    same settings and model reads it back instead of measuring it again. A rerun with other
    settings first moves every output of the earlier ones into ``replaced/N/``, so that no
    file of one setting ever sits beside those of another.
    """
    run_dir = Path(run_dir)
    check_fields(config)  # train_subset, and the training and gap settings' own
    check_gap_config(config.gap)
    validate_training(config.train)  # before the directory is made or held
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_directory(run_dir):
        return _study_in(config, run_dir, model, weights)


def _study_in(config: StudyConfig, run_dir: Path, model: str | None, weights) -> dict[str, Any]:
    started = time.perf_counter()
    progress = config.train.progress
    dataset = load_dataset(config.train.dataset, config.train.data_dir or None)
    if model is None:
        log.info("training on %s (%d images)", dataset.name, len(dataset.train))
        trained = train(config.train, run_dir, dataset=dataset)
    else:  # the user's own, trained elsewhere
        x = prepare_split(dataset, "test", config.train.likelihood)[:2]
        user = load_user_model(model, x, weights, config.train.device)
        trained = Trained(user.model, user.encoder, user.family,
                          replace(config.train, latent_dim=user.latent_dim),
                          dataset.image_shape, run_dir)  # fmt: skip
    train_seconds = time.perf_counter() - started
    device = next(trained.model.parameters()).device
    likelihood = config.train.likelihood
    stages = Stages(run_dir, _study_key(config, trained), STUDY_OUTPUTS)

    reports: dict[str, GapReport] = {}
    test_x = prepare_split(dataset, "test", likelihood)
    test_x = evaluation_subset(test_x, config.gap.max_points)
    train_x = evaluation_subset(prepare_split(dataset, "train", likelihood), config.train_subset)
    for split, x in (("train", train_x), ("test", test_x)):
        path = run_dir / f"gaps_{split}.json"
        if stages.finished(path.name):
            reports[split] = GapReport.from_json(path)
            log.info("gaps on the %s split: read back, measured before", split)
            continue
        log.info("measuring the gaps on %d %s images", len(x), split)
        reports[split] = measure_gaps(trained, x.to(device), config.gap, progress)
        reports[split].to_json(path)
        stages.finish(path.name)

    metrics = read_metrics(run_dir)  # [] when no epoch ran (--epochs 0)
    figures = _figures(trained, reports, metrics, test_x, run_dir)
    results = {
        "config": to_dict(config),
        "model": None if model is None else {"spec": model, "weights": str(weights or ""),
                                             "latent_dim": trained.model.latent_dim},
        "dataset": {
            "name": dataset.name,
            "train": len(dataset.train),
            "valid": len(dataset.valid),
            "test": len(dataset.test),
            "binarization": dataset.binarization,
        },
        "training": {
            "epochs": len(metrics),
            "best_valid_elbo": max(m["valid_elbo"] for m in metrics) if metrics else None,
            "seconds": train_seconds,
            "latent": _latent_summary(
                metrics, min(config.train.diagnostics_points, len(dataset.valid))
            ),
            "still_rising": _still_rising(metrics, config.train.epochs),
        },
        "gaps": {split: r.to_dict(per_datapoint=False) for split, r in reports.items()},
        "figures": figures,
        "machine": machine_summary(device),
        "seconds": time.perf_counter() - started,
    }
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    write_atomic(run_dir / "report.md", report_markdown(config, results, reports))
    return results


#: What a study writes beside the training run: set aside when the settings change.
STUDY_OUTPUTS = ("gaps_train.json", "gaps_test.json", "report.md", "results.json", "*.png")


def _study_key(config: StudyConfig, trained: Trained) -> str:
    """What a study's outputs depend on: its settings (not whether bars are shown) and the
    trained weights."""
    return settings_key(config, [trained.model, trained.encoder])


def settings_key(config: Any, modules: list[torch.nn.Module]) -> str:
    """A digest of a study's settings (all but whether progress bars are shown) and of the
    weights of ``modules``: what its finished stages (:class:`amortized.files.Stages`)
    depend on."""
    settings = to_dict(config)
    settings["train"].pop("progress")
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _still_rising(metrics: list[dict], epochs: int) -> float | None:
    """The last epoch's gain in validation ELBO where training ran out of epochs while it
    was still improving (the best epoch was the last): a sign of an undertrained model."""
    if len(metrics) < 2 or len(metrics) < epochs:  # stopped early: it had stopped improving
        return None
    last, before = metrics[-1]["valid_elbo"], metrics[-2]["valid_elbo"]
    return last - before if last >= metrics[-1]["best_valid_elbo"] and last > before else None


def _latent_summary(metrics: list[dict], points: int) -> dict[str, Any] | None:
    """The last epoch's collapse diagnostics on ``points`` datapoints, if training logged them."""
    if not metrics or "kl" not in metrics[-1]:
        return None
    keys = ("kl", "kl_per_dim", "active_units", "mutual_information", "collapsing")
    return {k: metrics[-1][k] for k in keys} | {"points": points}


def _figures(trained, reports, metrics, test_x, run_dir: Path) -> dict[str, str]:
    figures = {
        "gaps": plot_gap_bars(
            {
                split: {
                    "approximation": tuple(asdict(r.approximation_gap[r.encoder_family]).values()),
                    "amortization": tuple(asdict(r.amortization_gap).values()),
                }
                for split, r in reports.items()
            },
            run_dir / "gaps.png",
        ).name,
        "gap_histogram": plot_gap_histograms(
            {split: r.per_datapoint.amortization_gap(r.encoder_family).value
             for split, r in reports.items()},  # fmt: skip
            run_dir / "amortization_gap_hist.png",
        ).name,
    }
    if reports["test"].refinement:
        figures["refinement"] = plot_bound_against_cost(
            {split: _routes(r) for split, r in reports.items()}, run_dir / "refinement.png"
        ).name
    if metrics:
        figures["training"] = plot_training_curves(metrics, run_dir / "training.png").name
        if any("gaps" in m for m in metrics):
            figures["gaps_over_training"] = plot_gaps_over_training(
                metrics, run_dir / "gaps_over_training.png").name  # fmt: skip
        if all("kl_per_dim" in m for m in metrics):
            figures["latent_use"] = plot_latent_use(metrics, run_dir / "latent_use.png").name
    if trained.image_shape:
        model, encoder, family = trained.model, trained.encoder, trained.family
        with torch.no_grad():
            x = test_x[:10].to(next(model.parameters()).device)
            torch.manual_seed(0)
            recon, what = _mean_or_draw(model.likelihood(family.mean(encoder(x))))
            samples, _ = _mean_or_draw(model.likelihood(model.prior.sample((10,))))
        rows = {
            "test data": x.cpu().numpy(),
            f"reconstruction ({what}, z = E[z|x])": recon.cpu().numpy(),
            f"samples ({what}, z ~ p(z))": samples.cpu().numpy(),
        }
        figures["images"] = plot_images(rows, trained.image_shape, run_dir / "images.png").name
    return figures


def _mean_or_draw(px) -> tuple[torch.Tensor, str]:
    """E[x | z] where it has a closed form; a draw where it has none (autoregressive)."""
    try:
        return px.mean, "mean of p(x|z)"
    except NotImplementedError:
        return px.sample(), "a draw from p(x|z)"


def _routes(report: GapReport) -> dict[str, list[tuple[float, float]]]:
    """(seconds per datapoint, L) of every inference route of a report, for the cost plot."""
    sec, fam = report.seconds_per_datapoint, report.encoder_family
    return {
        "encoder + K refinement steps": [
            (sec["encoder"] + sec[f"refine/{k}"], q.mean) for k, q in report.refinement.items()
        ],
        f"per-datapoint optimum q* ({fam})": [
            (sec["encoder"] + sec[f"local/{fam}"], report.elbo_local[fam].mean)
        ],
        "log p(x)": [(float("nan"), report.log_px.mean)],
    }


def machine_summary(device: torch.device) -> dict[str, Any]:
    """Where and with what a study ran: platform, versions, threads, commit, command."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "amortized": __version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": _command(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _command() -> str:
    """The command line that is running, as a user would type it again."""
    if Path(sys.argv[0]).name in ("amortized", "__main__.py"):
        return shlex.join(["amortized", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def _commit() -> str | None:
    """The git commit of the package's source, where it runs from a checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


