"""Figures of a study: gap bars, training curves, per-datapoint gaps, images.

Every function takes plain data and a path, writes one PNG and returns the path, so
the figures can be remade from ``results.json`` without the models.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or used
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..files import write_atomic  # noqa: E402

__all__ = [
    "plot_gap_bars",
    "plot_training_curves",
    "plot_gap_histograms",
    "plot_images",
    "plot_bound_against_cost",
    "plot_refinement_gain",
]


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    if tight:
        fig.tight_layout()
    buffer = io.BytesIO()  # rendered in memory, then written atomically
    fig.savefig(buffer, dpi=120, format="png")
    write_atomic(path, buffer.getvalue())
    plt.close(fig)
    return path


def plot_gap_bars(
    gaps: dict[str, dict[str, tuple[float, ...]]], path: str | Path
) -> Path:
    """Stacked bars: approximation + amortization = inference gap, one bar per data split.

    ``gaps[split] = {"approximation": (mean, mc_se, data_se), "amortization": (...)}``:
    each segment carries its sampling error over datapoints (black) and its Monte Carlo
    error (red, beside it), the two kinds told apart (:class:`amortized.measure.report.Quantity`).
    """
    splits = list(gaps)
    pos = np.arange(len(splits))
    approx = np.array([gaps[s]["approximation"][0] for s in splits])
    amort = np.array([gaps[s]["amortization"][0] for s in splits])
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.bar(pos, approx, 0.6, label="approximation gap", color="#4c72b0")
    ax.bar(pos, amort, 0.6, bottom=approx, label="amortization gap", color="#dd8452")
    for i, s in enumerate(splits):
        for part, top in (("approximation", approx[i]), ("amortization", approx[i] + amort[i])):
            _, mc_se, *data_se = gaps[s][part]
            if data_se:
                ax.errorbar(i, top, yerr=data_se[0], color="k", capsize=3,
                            label="± s.e. over datapoints" if i == 0 and part == "amortization"
                            else None)  # fmt: skip
            ax.errorbar(i + 0.08, top, yerr=mc_se, color="#c44e52", capsize=2, lw=2,
                        label="± Monte Carlo s.e." if i == 0 and part == "amortization"
                        else None)  # fmt: skip
        above = max(gaps[s]["amortization"][1:])  # the label clears both error bars
        ax.text(i - 0.2, approx[i] + amort[i] + above, f"{approx[i] + amort[i]:.2f}",
                ha="right", va="bottom")  # fmt: skip
    ax.set_xticks(pos, splits)
    ax.set_ylabel("nats per datapoint")
    ax.set_title("Inference gap = approximation + amortization")
    ax.legend(loc="upper left", fontsize=7)
    ax.margins(y=0.15)
    return _save(fig, path)


def plot_training_curves(metrics: Sequence[dict], path: str | Path) -> Path:
    """Training objective and validation ELBO per epoch."""
    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [-m["train_loss"] for m in metrics], label="train bound (warm-up weighted)")
    ax.plot(epochs, [m["valid_elbo"] for m in metrics], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    valid = np.array([m["valid_elbo"] for m in metrics], dtype=float)
    train = -np.array([m["train_loss"] for m in metrics], dtype=float)
    valid, both = valid[np.isfinite(valid)], np.concatenate([train, valid])
    both = both[np.isfinite(both)]
    if len(valid) > 1:  # the first epochs are far below the rest; keep the scale readable
        low, high = np.percentile(valid, 5), both.max()  # non-finite epochs are left out
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_latent_use(metrics: Sequence[dict], path: str | Path) -> Path:
    """KL per latent dimension over training (a heat map, dimensions sorted by their final
    KL), beside the total KL, the active units and I(x; z) per epoch."""
    epochs = np.array([m["epoch"] for m in metrics])
    kl = np.array([m["kl_per_dim"] for m in metrics], dtype=float)  # (epochs, D)
    order = np.argsort(-kl[-1])
    fig, (heat, lines) = plt.subplots(1, 2, figsize=(10, 3.6))
    image = heat.imshow(
        np.log10(np.clip(kl[:, order].T, 1e-3, None)), aspect="auto", origin="lower",
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, kl.shape[1] - 0.5), cmap="viridis",
    )  # fmt: skip
    fig.colorbar(image, ax=heat, label="log10 KL (nats)")
    heat.set_xlabel("epoch")
    heat.set_ylabel("latent dimension (by final KL)")
    heat.set_title("KL per dimension")
    lines.plot(epochs, kl.sum(1), label="KL (nats)")
    lines.plot(epochs, [m["mutual_information"] for m in metrics], label="I(x; z) (nats)")
    lines.plot(epochs, [m["active_units"] for m in metrics], label="active units")
    lines.set_xlabel("epoch")
    lines.set_title("use of the latent code (validation points)")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8)
    return _save(fig, path)


def plot_gap_histograms(amortization: dict[str, np.ndarray], path: str | Path) -> Path:
    """Per-datapoint amortization gaps, one histogram per split."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = np.concatenate(list(amortization.values()))
    bins = np.linspace(np.percentile(values, 0.5), np.percentile(values, 99.5), 40)
    for split, gap in amortization.items():
        ax.hist(gap, bins=bins, alpha=0.5, density=True, label=f"{split} (mean {gap.mean():.2f})")
    ax.set_xlabel("amortization gap L[q*] - L[q] (nats)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bound_against_cost(
    routes: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path
) -> Path:
    """The bound each inference route reaches against its time per datapoint.

    ``routes[split][route] = [(seconds per datapoint, nats), ...]``; a route whose time is
    NaN (log p(x)) is drawn as a horizontal line.
    """
    fig, axes = plt.subplots(1, len(routes), figsize=(5 * len(routes), 3.6), squeeze=False)
    for ax, (split, by_route) in zip(axes[0], routes.items(), strict=True):
        colors = plt.cm.tab20.colors if len(by_route) > 10 else [f"C{i}" for i in range(10)]
        for (route, points), color in zip(by_route.items(), colors, strict=False):
            t, value = np.array(points, dtype=float).T
            if np.isnan(t).all():
                ax.axhline(value[0], color="k", ls="--", lw=1, label=route)
                continue
            ax.plot(t * 1e3, value, "o-" if len(t) > 1 else "s", color=color, label=route)
        ax.set_xscale("log")
        ax.set_xlabel("inference time per datapoint (ms)")
        ax.set_ylabel("nats per datapoint")
        ax.set_title(split)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_images(rows: dict[str, np.ndarray], image_shape: Sequence[int], path: str | Path) -> Path:
    """A grid of images, one labelled row per entry of ``rows`` (each ``(n, prod(shape))``)."""
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.0 * n, 1.25 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(np.asarray(images[c]).reshape(image_shape), cmap="gray_r", vmin=0, vmax=1)
        axes[r, 0].set_title(label, fontsize=9, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.35)
    return _save(fig, path, tight=False)


def plot_gaps_over_training(metrics: Sequence[dict], path: str | Path) -> Path:
    """The approximation and amortization gaps on the fixed training and validation
    subsets at every epoch they were measured (``gap_every``), with their Monte Carlo
    errors, as Cremer, Li & Duvenaud (2018) show them over training."""
    measured = [m for m in metrics if "gaps" in m]
    epochs = np.array([m["epoch"] for m in measured])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for split, style in (("train", "-"), ("valid", "--")):
        for gap, color in (("approximation", "C0"), ("amortization", "C1")):
            mean = np.array([m["gaps"][split][gap] for m in measured])
            se = np.array([m["gaps"][split][f"{gap}_mc_se"] for m in measured])
            ax.errorbar(epochs, mean, yerr=2 * se, fmt="o" + style, ms=3, color=color,
                        capsize=2, label=f"{gap} gap, {split} subset")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_ylabel("nats per datapoint (± 2 MC s.e.)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_refinement_gain(curves: dict[str, list[tuple[float, float, float]]], path: str | Path
                         ) -> Path:  # fmt: skip
    """What refinement recovers against what it costs, one curve per (model, data) pair.

    ``curves[label] = [(milliseconds per datapoint, nats gained over the encoder's L[q],
    paired MC s.e.), ...]`` by number of steps K; labels ending in "(shifted)" are drawn
    dashed: the model scored on another dataset's images.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (label, points) in enumerate(curves.items()):
        ms, gain, se = np.array(points, dtype=float).T
        ax.errorbar(ms, gain, yerr=2 * se, fmt="o--" if label.endswith("(shifted)") else "o-",
                    ms=3, capsize=2, color=f"C{i}", label=label)  # fmt: skip
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("refinement time per datapoint (ms)")
    ax.set_ylabel("L[q_K] - L[q] (nats, ± 2 MC s.e.)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
