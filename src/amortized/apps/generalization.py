"""How amortized inference generalizes: one command, one report (``amortized generalization``).

Three views of "the encoder must handle x it never saw" (Cremer, Li & Duvenaud 2018):

- **over training**: the approximation and amortization gaps on fixed training and
  validation subsets every ``train.gap_every`` epochs, for each of the two models;
- **distribution shift**: a VAE trained on one dataset and one trained on another, each
  scored on both test sets: how much the amortization gap grows out of distribution, and
  how much refinement from the encoder's output buys back per millisecond;
- **encoder capacity**: on the first model's decoder, held fixed, an encoder of the
  standard size and a larger one (784-500-500-500 by default) trained afresh for the same
  epochs and scored on the same images, beside the encoder trained with the decoder.

Outputs in the run directory: ``report.md``, ``results.json``, one gap report per
(model, data) pair (``gaps_A_on_B.json``), ``capacity.json``, the training runs
(``train-NAME/``) and encoder runs (``encoder-standard/``, ``encoder-large/``), and the
figures. Every stage resumes: rerun the same command after a kill.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, GeneralizationConfig, check_fields, to_dict
from ..data import load_dataset
from ..estimators import elbo
from ..files import Stages, lock_directory, write_atomic
from ..measure.quantities import Quantity, Rows
from ..measure.report import GapReport, difference
from ..nets.encoders import MLPEncoder
from ..train import Trained, evaluation_subset, prepare_split, read_metrics, train
from ..train import validate as validate_training
from ..train.fit import fit
from .plots import plot_gaps_over_training, plot_refinement_gain
from .study import check_gap_config, machine_summary, measure_gaps, settings_key
from .study_report import provenance_section

__all__ = ["run_generalization"]

log = logging.getLogger(__name__)  # shown by the command line; silent in a library

#: What the study writes beside its training runs: set aside when the settings change.
OUTPUTS = ("gaps_*_on_*.json", "capacity.json", "report.md", "results.json", "*.png")

#: Validation images scored after every epoch of an encoder trained on the fixed decoder.
ENCODER_VALID_POINTS = 1000


def run_generalization(config: GeneralizationConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) both models and both encoders, measure, and write the report."""
    run_dir = Path(run_dir)
    check_fields(config)
    check_gap_config(config.gap)
    if config.shift_dataset == config.train.dataset:
        raise ConfigError(f"--shift-dataset is {config.shift_dataset!r}, the training dataset "
                          "itself: choose another")  # fmt: skip
    if _slug(config.shift_dataset) == _slug(config.train.dataset):
        raise ConfigError(f"--dataset and --shift-dataset share the name "
                          f"{_slug(config.shift_dataset)!r}, which names their runs and "
                          "reports: rename one file")  # fmt: skip
    for name in (config.train.dataset, config.shift_dataset):
        validate_training(replace(config.train, dataset=name))
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_directory(run_dir):
        return _study_in(config, run_dir)


def _slug(name: str) -> str:
    return Path(name).stem


def _study_in(config: GeneralizationConfig, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    tc, progress = config.train, config.train.progress
    names = [tc.dataset, config.shift_dataset]
    datasets = {name: load_dataset(name, tc.data_dir or None) for name in names}
    shapes = {name: ds.data_dim for name, ds in datasets.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"the two datasets' images differ in size ({shapes}): a model of "
                          "one cannot score the other")  # fmt: skip
    trained = {}
    for name in names:
        log.info("training on %s (%d images)", name, len(datasets[name].train))
        trained[name] = train(replace(tc, dataset=name), run_dir / f"train-{_slug(name)}",
                              dataset=datasets[name])  # fmt: skip
    train_seconds = time.perf_counter() - started
    modules = [m for t in trained.values() for m in (t.model, t.encoder)]
    stages = Stages(run_dir, settings_key(config, modules), OUTPUTS)
    device = next(trained[names[0]].model.parameters()).device
    tests = {name: evaluation_subset(prepare_split(ds, "test", tc.likelihood),
                                     config.gap.max_points).to(device)
             for name, ds in datasets.items()}  # fmt: skip

    def measured(model_name: str, x: Tensor, what: str, name: str) -> GapReport:
        """The model's gap report on x: read back where a finished stage holds it."""
        path = run_dir / f"gaps_{_slug(model_name)}_on_{name}.json"
        if stages.finished(path.name):
            return GapReport.from_json(path)
        log.info("measuring the %s model on %d %s", _slug(model_name), len(x), what)
        report = measure_gaps(trained[model_name], x, config.gap, progress)
        report.to_json(path)
        stages.finish(path.name)
        return report

    reports = {(m, d): measured(m, tests[d], f"{_slug(d)} test images", _slug(d))
               for m in names for d in names}  # fmt: skip
    first = names[0]  # its model's decoder, held fixed, is where the encoders are compared
    train_x = evaluation_subset(prepare_split(datasets[first], "train", tc.likelihood),
                                config.gap.max_points).to(device)  # fmt: skip
    train_report = measured(first, train_x, "of its training images", f"{_slug(first)}-train")
    scored = {"train": (train_x, train_report), "test": (tests[first], reports[first, first])}
    capacity = _capacity(config, trained[first], datasets[first], scored, run_dir, stages)
    metrics = {name: read_metrics(run_dir / f"train-{_slug(name)}") for name in names}
    figures = _figures(names, reports, metrics, run_dir)
    results = {
        "config": to_dict(config),
        "datasets": {_slug(name): {"name": name, "train": len(ds.train), "test": len(tests[name]),
                            "binarization": ds.binarization} for name, ds in datasets.items()},
        "training": {"seconds": train_seconds,
                     "epochs": {_slug(name): len(m) for name, m in metrics.items()}},  # fmt: skip
        "shift": _shift(names, reports),
        "refinement": _refinement(names, reports),
        "capacity": capacity,
        "figures": figures,
        "machine": machine_summary(device),
        "seconds": time.perf_counter() - started,
    }
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    write_atomic(run_dir / "report.md", _markdown(config, names, results))
    return results


def _pair(model_name: str, data_name: str) -> str:
    shifted = "" if model_name == data_name else " (shifted)"
    return f"{_slug(model_name)} on {_slug(data_name)}{shifted}"


def _q(q: Quantity) -> dict[str, float]:
    return {"mean": q.mean, "mc_se": q.mc_se, "data_se": q.data_se}


def _shift(names: list[str], reports) -> dict[str, Any]:
    """Each pair's levels and gaps; how much each model's amortization gap grows when it
    scores the other dataset's images (unpaired: other images, so both errors add)."""
    rows = {}
    for (m, d), r in reports.items():
        fam = r.encoder_family
        rows[_pair(m, d)] = {
            "model": _slug(m), "data": _slug(d), "log_px": _q(r.log_px),
            "elbo_local": _q(r.elbo_local[fam]), "elbo_amortized": _q(r.elbo_amortized),
            "approximation_gap": _q(r.approximation_gap[fam]),
            "amortization_gap": _q(r.amortization_gap), "log_px_method": r.log_px_method,
        }  # fmt: skip
    growth = {}
    for m in names:
        other = next(d for d in names if d != m)
        growth[_slug(m)] = {gap: _q(difference(reports[m, other], reports[m, m], quantity,
                                        paired=False))
                     for gap, quantity in (("amortization_gap", "amortization_gap"),
                                           ("approximation_gap",
                                            f"approximation_gap/{reports[m, m].encoder_family}"))}
    return {"pairs": rows, "growth_out_of_distribution": growth}


def _refinement(names: list[str], reports) -> dict[str, list[dict[str, float]]]:
    """Per pair and K: what K refinement steps recover over the encoder's L[q] (paired on
    the same images), the share of the amortization gap that is, and its cost."""
    out = {}
    for (m, d), r in reports.items():
        amortization = r.amortization_gap.mean
        steps = []
        for k in sorted(int(k) for k in r.refinement if k != "0"):
            gain = r.contrast(f"elbo_refined/{k}", "elbo_amortized")
            ms = 1000 * r.seconds_per_datapoint[f"refine/{k}"]
            steps.append({"steps": k, "gain": gain.mean, "gain_mc_se": gain.mc_se,
                          "gain_data_se": gain.data_se, "ms_per_datapoint": ms,
                          "share_of_amortization_gap": gain.mean / amortization
                          if amortization > 0 else float("nan"),
                          "nats_per_ms": gain.mean / ms if ms > 0 else float("nan")})  # fmt: skip
        out[_pair(m, d)] = steps
    return out


def _capacity(config: GeneralizationConfig, trained: Trained, dataset,
              scored: dict[str, tuple[Tensor, GapReport]], run_dir: Path, stages: Stages
              ) -> dict[str, Any]:  # fmt: skip
    """Encoders of two sizes trained afresh on the model's fixed decoder, each scored on
    the images x of every ``(x, report)`` in ``scored`` (training and test images).

    Their amortization gaps are taken against the q* of those reports (the same model,
    the same images), so each difference is paired.
    """
    path = run_dir / "capacity.json"
    if stages.finished(path.name):
        return json.loads(path.read_text())
    tc, gc = config.train, config.gap
    model, family = trained.model, trained.family
    device = next(model.parameters()).device
    train_x = prepare_split(dataset, "train", tc.likelihood).to(device)
    valid_x = evaluation_subset(prepare_split(dataset, "valid", tc.likelihood, tc.seed),
                                ENCODER_VALID_POINTS).to(device)  # fmt: skip
    images = {split: x for split, (x, _) in scored.items()}
    reports = {split: report for split, (_, report) in scored.items()}
    bounds = {"trained with its decoder": {s: r.rows("elbo_amortized") for s, r in reports.items()}}
    encoders = {"trained with its decoder": (trained.encoder, list(tc.hidden))}
    model.requires_grad_(False)  # the decoder stays as it is; only the encoders learn
    try:
        for name, hidden in (("standard", tc.hidden), ("large", config.capacity_hidden)):
            torch.manual_seed(tc.seed)
            encoder = MLPEncoder(train_x.shape[1], family, hidden=hidden,
                                 activation=tc.activation).to(device)  # fmt: skip

            def loss(xb, encoder=encoder):
                return -elbo(model, family, encoder(xb), xb).mean()

            def score(encoder=encoder):
                with torch.no_grad():
                    return {"valid_elbo": float(elbo(model, family, encoder(valid_x),
                                                     valid_x).mean())}  # fmt: skip

            log.info("training a %s encoder %s on the fixed decoder", name, list(hidden))
            fit(encoder, loss, train_x, score, run_dir / f"encoder-{name}",
                epochs=config.capacity_epochs or tc.epochs, batch_size=tc.batch_size,
                lr=tc.lr, seed=tc.seed)  # fmt: skip
            label = f"{name}, trained on the fixed decoder"
            encoders[label] = (encoder, list(hidden))
            bounds[label] = {}
            for split, x in images.items():
                torch.manual_seed(gc.eval_seed)
                with torch.no_grad():
                    value, se = elbo(model, family, encoder(x), x, samples=gc.elbo_samples,
                                     stderr=True)  # fmt: skip
                bounds[label][split] = Rows(value, se)
    finally:
        model.requires_grad_(True)
    rows = {}
    for label, (encoder, hidden) in encoders.items():
        rows[label] = {"hidden": hidden, "parameters": sum(p.numel() for p in encoder.parameters())}
        for split, report in reports.items():
            bound, local = bounds[label][split], report.rows(f"elbo_local/{family.name}")
            rows[label][split] = {"elbo_amortized": _q(bound.mean()),
                                  "amortization_gap": _q((local - bound).mean())}  # fmt: skip
    large, standard = (bounds[f"{n}, trained on the fixed decoder"] for n in ("large", "standard"))
    out = {"images": {split: r.n for split, r in reports.items()},
           "epochs": config.capacity_epochs or tc.epochs, "encoders": rows,
           "large_minus_standard": {split: _q((large[split] - standard[split]).mean())
                                    for split in scored}}  # fmt: skip
    write_atomic(path, json.dumps(out, indent=2))
    stages.finish(path.name)
    return out


def _figures(names, reports, metrics, run_dir: Path) -> dict[str, str]:
    figures = {}
    for name in names:
        if any("gaps" in m for m in metrics[name]):
            figures[f"gaps_over_training/{_slug(name)}"] = plot_gaps_over_training(
                metrics[name], run_dir / f"gaps_over_training_{_slug(name)}.png").name
    curves = {}
    for (m, d), r in reports.items():
        points = [(0.0, 0.0, 0.0)]
        for k in sorted(int(k) for k in r.refinement if k != "0"):
            gain = r.contrast(f"elbo_refined/{k}", "elbo_amortized")
            points.append((1000 * r.seconds_per_datapoint[f"refine/{k}"], gain.mean, gain.mc_se))
        if len(points) > 1:
            curves[_pair(m, d)] = points
    if curves:
        figures["refinement"] = plot_refinement_gain(curves, run_dir / "refinement_shift.png").name
    return figures


def _markdown(config: GeneralizationConfig, names: list[str], results: dict[str, Any]) -> str:
    tc, gc = config.train, config.gap
    names = [_slug(name) for name in names]
    shift, cap = results["shift"], results["capacity"]
    epochs = results["training"]["epochs"]

    def f(q: dict[str, float]) -> str:
        return f"{q['mean']:.2f} ± {q['mc_se']:.2f} [± {q['data_se']:.2f}]"

    lines = [
        f"# How amortized inference generalizes: {names[0]} and {names[1]}", "",
        f"Two VAEs ({tc.likelihood} decoder, z in R^{tc.latent_dim}, MLP {list(tc.hidden)}, "
        f"{tc.family} encoder), trained for {epochs[names[0]]} and {epochs[names[1]]} epochs, "
        f"each scored on {gc.max_points or 'all'} test images of both datasets. Errors: "
        "mean ± Monte Carlo s.e. [± sampling s.e. over the images]; nats per image.", "",
        "## Gaps over training", "",
        f"Every {tc.gap_every} epochs, on {tc.gap_points} fixed training and validation "
        "images each: the amortization gap on training images against validation images is "
        "how well the encoder generalizes as training goes on.", "",
    ]  # fmt: skip
    for name in names:
        key = f"gaps_over_training/{name}"
        if key in results["figures"]:
            lines += [f"![gaps over training, {name}]({results['figures'][key]})", ""]
    lines += ["## Distribution shift", "",
              "| model on data | log p(x) | L[q*] | L[q] (encoder) | approximation gap | "
              "amortization gap |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in shift["pairs"].items():
        lines.append(f"| {label} | {f(r['log_px'])} | {f(r['elbo_local'])} | "
                     f"{f(r['elbo_amortized'])} | {f(r['approximation_gap'])} | "
                     f"{f(r['amortization_gap'])} |")  # fmt: skip
    lines += [""]
    for m, growth in shift["growth_out_of_distribution"].items():
        g = growth["amortization_gap"]
        lines.append(f"- The {m} model's amortization gap grows by {g['mean']:.2f} ± "
                     f"{g['mc_se']:.2f} [± {g['data_se']:.2f}] nats on the other dataset's "
                     f"images (its approximation gap by "
                     f"{growth['approximation_gap']['mean']:.2f}).")  # fmt: skip
    lines += ["", "## What refinement buys back", "",
              "K gradient steps from the encoder's output (`amortized.refine`); gain over the "
              "encoder's L[q], paired on the same images; share of that pair's amortization "
              "gap; wall time per image.", "",
              "| model on data | K | gain (nats) | share of the gap | ms per image | "
              "nats per ms |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, steps in results["refinement"].items():
        for s in steps:
            lines.append(f"| {label} | {s['steps']} | {s['gain']:.2f} ± {s['gain_mc_se']:.2f} | "
                         f"{s['share_of_amortization_gap']:.0%} | {s['ms_per_datapoint']:.2f} | "
                         f"{s['nats_per_ms']:.3f} |")  # fmt: skip
    if "refinement" in results["figures"]:
        lines += ["", f"![refinement against its cost]({results['figures']['refinement']})"]
    images = cap["images"]
    lines += ["", "## Encoder capacity", "",
              f"On the {names[0]} model's decoder, held fixed: encoders trained afresh for "
              f"{cap['epochs']} epochs, each scored on the same {images['train']} training and "
              f"{images['test']} test images; the amortization gap against the same q*.", "",
              "| encoder | hidden | parameters | L[q], train | amortization gap, train | "
              "L[q], test | amortization gap, test |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, row in cap["encoders"].items():
        cells = [f(row[split][q]) for split in ("train", "test")
                 for q in ("elbo_amortized", "amortization_gap")]  # fmt: skip
        lines.append(f"| {label} | {row['hidden']} | {row['parameters']:,} | "
                     + " | ".join(cells) + " |")
    d = cap["large_minus_standard"]
    lines += ["", f"The larger encoder's L[q] minus the standard one's, paired: {f(d['train'])} "
              f"on the training images, {f(d['test'])} on the test images.", ""]
    results = {**results, "training": {"seconds": results["training"]["seconds"]}}
    return "\n".join(lines + provenance_section(config, results))
