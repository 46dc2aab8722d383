"""The study's report: what ``report.md`` says, section by section, from the results and
the gap reports that :func:`amortized.apps.study.run_study` measured."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..config import GapConfig, StudyConfig
from ..measure.report import GapReport, PerDatapoint, Rows, difference

__all__ = ["report_markdown"]


_METHOD_NAMES = {"adam": "Adam", "sgd": "momentum-SGD"}


def _latent_use_section(latent: dict[str, Any], fig: dict[str, str]) -> list[str]:
    dims = len(latent["kl_per_dim"])
    return [
        "## Is the latent code used?",
        "",
        f"At the last epoch, on {latent['points']} validation points: KL(q(z|x) || p(z)) "
        f"{latent['kl']:.2f} nats, {latent['active_units']} of {dims} units active "
        f"(Var_x E_q[z_u] > 0.01), I(x; z) {latent['mutual_information']:.2f} nats"
        + f" (at most log N = {math.log(latent['points']):.2f})."
        + (" **The latent code is collapsing.**" if latent["collapsing"] else ""),
        "",
        f"![KL per dimension over training]({fig['latent_use']})",
        "",
    ]


def _refinement_section(train_r: GapReport, test_r: GapReport, fig, gc: GapConfig) -> list[str]:
    if not test_r.refinement:
        return []

    fam = test_r.encoder_family

    def cell(rows: Rows, base: Rows, seconds: float | None) -> str:
        gain = (rows - base).mean()  # paired: the same datapoints
        cost = "" if seconds is None else f" ({seconds * 1e3:.2f} ms)"
        return (f"{rows.mean().mean:.3f}, {gain.mean:+.3f} ± {gain.mc_se:.3f} "
                f"[± {gain.data_se:.3f}]{cost}")  # fmt: skip

    def cells(at: Callable[[PerDatapoint], Rows], route: str | None) -> str:
        return " | ".join(
            cell(at(r.per_datapoint), r.per_datapoint.elbo_amortized,
                 None if route is None else r.seconds_per_datapoint[route])
            for r in (train_r, test_r)
        )  # fmt: skip

    def row(k: str) -> str:
        return f"| {k} | {cells(lambda per: per.elbo_refined[int(k)], f'refine/{k}')} |"

    return [
        "## Buying the bound back: refinement from the encoder's output",
        "",
        f"L[q] after K {_METHOD_NAMES[gc.refine_method]} steps (lr {gc.refine_lr}) on each "
        "datapoint's ELBO, starting at the encoder's output, and its gain over the "
        "encoder's L[q] on the same datapoints (paired: mean ± Monte Carlo s.e. [± s.e. "
        "over the datapoints]); in brackets the refinement's cost per datapoint. "
        f"L[q*] ({fam}) is where the steps lead.",
        "",
        "| K | training subset | test |",
        "|---|---|---|",
        *[row(k) for k in test_r.refinement],
        f"| q* | {cells(lambda per: per.elbo_local[fam], None)} |",
        "",
        f"![bound against inference cost]({fig['refinement']})",
        "",
    ]


def _generalisation_sentence(d) -> str:
    """What the test-minus-train amortization gap says, with its error over datapoints."""
    error = math.hypot(d.mc_se, d.data_se)
    verdict = (
        "a difference the two samples of datapoints resolve"
        if abs(d.mean) > 2 * error
        else "within two standard errors of no difference at all"
    )
    return (
        "The encoder was fitted to the training data; on the test split its amortization gap "
        f"is {abs(d.mean):.2f} nats {'larger' if d.mean >= 0 else 'smaller'} than on the "
        f"training subset ({d.mean:+.3f} ± {error:.3f}, Monte Carlo and sampling error "
        f"together): {verdict}."
    )


def report_markdown(config: StudyConfig, results: dict[str, Any],
                    reports: dict[str, GapReport]) -> str:  # fmt: skip
    """``report.md``: the header, the gaps, refinement, cost, training and provenance."""
    fig = results["figures"]
    lines = [
        *_header(config.train, results, results.get("model")),
        *_gap_section(reports, fig, config.gap),
        *_refinement_section(reports["train"], reports["test"], fig, config.gap),
        *_cost_section(reports["train"], reports["test"]),
    ]
    if "training" in fig:
        lines += ["## Training", "", f"![training curves]({fig['training']})", ""]
    if "gaps_over_training" in fig:
        lines += ["## Gaps over training", "",
                  f"Measured every {config.train.gap_every} epochs on {config.train.gap_points} "
                  "fixed training and validation images each (IWAE-1000, q* by 500 steps).", "",
                  f"![gaps over training]({fig['gaps_over_training']})", ""]  # fmt: skip
    if "latent_use" in fig:
        lines += _latent_use_section(results["training"]["latent"], fig)
    if "images" in fig:
        lines += ["## Reconstructions and samples", "", f"![images]({fig['images']})", ""]
    return "\n".join(lines + provenance_section(config, results))


def _header(tc, results: dict[str, Any], user: dict[str, str] | None = None) -> list[str]:
    data, training = results["dataset"], results["training"]
    if user is not None:  # a model of the user's own: what it is, not how we trained it
        weights = f", weights {user['weights']}" if user["weights"] else ", untrained"
        return [f"# Amortization study: {data['name']}", "",
                f"Model: your own, `{user['spec']}`{weights}; z in R^{user['latent_dim']}.",
                f"Data: {data['train']} train / {data['valid']} valid / {data['test']} test, "
                f"binarization: {data['binarization']}.", ""]  # fmt: skip
    best = (f" (best validation ELBO {training['best_valid_elbo']:.2f})."
            if _was_trained(results) else ".")  # fmt: skip
    return [
        f"# Amortization study: {data['name']}",
        "",
        f"Model: {tc.likelihood} decoder, z in R^{tc.latent_dim}, MLP {list(tc.hidden)} "
        f"({tc.activation}), {tc.family} Gaussian encoder, trained on the {tc.objective.upper()}"
        f"{f'-{tc.samples}' if tc.objective == 'iwae' else ''} for "
        f"{training['epochs']} epochs{best}",
        f"Data: {data['train']} train / {data['valid']} valid / {data['test']} test, "
        f"binarization: {data['binarization']}.",
        "",
    ] + ([
        f"**The model may be undertrained**: the validation ELBO still rose by "
        f"{training['still_rising']:.2f} nats in the last epoch, which was the best; more "
        "epochs (`--epochs`) would move every number below.",
        "",
    ] if training.get("still_rising") else [])  # fmt: skip


def _gap_section(reports: dict[str, GapReport], fig: dict[str, str], gc: GapConfig) -> list[str]:
    train_r, test_r = reports["train"], reports["test"]
    fam = test_r.encoder_family

    def row(label: str, quantity: str) -> str:
        d = difference(test_r, train_r, quantity)  # unpaired: different datapoints
        return (f"| {label} | {train_r.quantity(quantity)} | {test_r.quantity(quantity)} "
                f"| {d.mean:+.3f} ± {d.mc_se:.3f} [± {d.data_se:.3f}] |")  # fmt: skip

    estimates = list(test_r.log_px_estimates) if len(test_r.log_px_estimates) > 1 else []
    others = [name for name in test_r.approximation_gap if name != fam]
    return [
        "## Inference gaps",
        "",
        "Nats per datapoint, as mean ± Monte Carlo s.e. [± s.e. over the datapoints]. The "
        "first error is the draws' (the same datapoints measured again); the second is the "
        "datapoints' (another sample of as many from the same split). The last column is "
        "test minus training subset with the errors of that difference, unpaired: the two "
        "sets hold different datapoints.",
        "",
        f"log p(x) by {test_r.log_px_method}; every L[.] from {gc.elbo_samples} samples; q* by "
        f"per-datapoint optimisation (Adam, <= {gc.local_steps} steps, init: {gc.local_init}).",
        "",
        *[f"- {split}: {line}" for split, r in reports.items()
          for line in r.convergence().splitlines()],  # fmt: skip
        *[f"- **warning**, {split}: {line}" for split, r in reports.items()
          for line in r.warnings()],  # fmt: skip
        "",
        "| quantity | training subset | test | test - train |",
        "|---|---|---|---|",
        f"| datapoints | {train_r.n} | {test_r.n} | |",
        row("log p(x)", "log_px"),
        *[row(f"log p(x) by {name}", f"log_px/{name}") for name in estimates],
        *[row(f"L[q*] {name}", f"elbo_local/{name}") for name in test_r.elbo_local],
        row("L[q] encoder", "elbo_amortized"),
        row(f"approximation gap ({fam})", f"approximation_gap/{fam}"),
        row("amortization gap", "amortization_gap"),
        row("inference gap", "inference_gap"),
        *[row(f"approximation gap ({name})", f"approximation_gap/{name}") for name in others],
        "",
        _generalisation_sentence(difference(test_r, train_r, "amortization_gap")),
        "",
        f"![gaps]({fig['gaps']})  ![amortization gap per datapoint]({fig['gap_histogram']})",
        "",
    ]


def _cost_section(train_r: GapReport, test_r: GapReport) -> list[str]:
    return [
        "## Cost of inference (milliseconds per datapoint)",
        "",
        "| route | training subset | test |",
        "|---|---|---|",
        *[f"| {route} | {train_r.seconds_per_datapoint[route] * 1e3:.4f} "
          f"| {test_r.seconds_per_datapoint[route] * 1e3:.4f} |"
          for route in test_r.seconds_per_datapoint],  # fmt: skip
        "",
        "`encoder` is one forward pass; `refine/K` is K refinement steps from its output; "
        "`local/*` is per-datapoint optimisation of lambda (batched); `iwae` the log p(x) "
        "estimate.",
        "",
    ]


def provenance_section(config: Any, results: dict[str, Any]) -> list[str]:
    """The report's last section: machine, versions, seeds (``config.train.seed``,
    ``config.gap.eval_seed``) and the command."""
    m = results["machine"]
    return [
        "## Machine and provenance",
        "",
        f"{m['platform']}, {m['processor']}, torch {m['torch']}, {m['threads']} threads, "
        f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}. "
        f"Study wall time {results['seconds']:.0f} s "
        f"(training {results['training']['seconds']:.0f} s).",
        "",
        f"amortized {m.get('amortized', '?')} (commit {m.get('commit') or 'unknown'}), "
        f"Python {m.get('python', '?')}, numpy {m.get('numpy', '?')}; training seed "
        f"{config.train.seed}, estimates' seed {config.gap.eval_seed}. Command: "
        f"`{m.get('command', '?')}`. Every setting is in results.json and config.toml.",
        "",
    ]

def _was_trained(results: dict[str, Any]) -> bool:
    return results["training"]["best_valid_elbo"] is not None
