r"""What a gap report holds: means with their two errors, and the differences users read.

Every mean carries two errors (:class:`Quantity`): Monte Carlo error, from the random
draws of the estimates, and sampling error over datapoints, from which n datapoints were
measured. A difference between two reports (:func:`difference`: model against model on
the same data, train against test) gets its own: paired where the datapoints are the
same, unpaired where they are not. :func:`merge_reports` joins reports on shards.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..files import write_atomic
from ..weights import khat_threshold
from .quantities import PerDatapoint, Quantity, Rows

__all__ = ["GapReport", "PerDatapoint", "Quantity", "Rows", "difference", "merge_reports"]

#: Per estimate of log p(x): what its weights are, and what to raise for more of them.
_WEIGHTS_OF = {"iwae": ("draws", "raise iwae_k or estimate by AIS (ais_steps)"),
               "ais": ("chains", "raise ais_chains or ais_steps")}  # fmt: skip


@dataclass
class GapReport:
    """What :func:`gap_report` measured. Means are over the n datapoints, in nats.

    ``elbo_local`` and ``approximation_gap`` have one entry per family optimised per
    datapoint; ``amortization_gap`` is taken against the encoder's own family.
    ``refinement`` maps K (as a string) to L[q] after K refinement steps from the
    encoder's output (:func:`amortized.refine`), whose cost per datapoint is
    ``seconds_per_datapoint["refine/K"]``. ``per_datapoint`` (:class:`PerDatapoint`)
    holds the estimates behind every mean, row by row, by what they measured (None for a
    report read back without them); ``seconds_per_datapoint`` the wall-clock cost of each
    inference route.
    ``log_px_weights`` summarises, per estimate of log p(x), what its importance weights say
    (:mod:`amortized.weights`): the Pareto k-hat of each row's weights (rows above the
    threshold are too heavy-tailed to trust) and what more weights would still gain.
    ``data_id`` identifies the data (a digest of x), so that :func:`difference` pairs two
    reports on the same datapoints.
    """

    n: int
    encoder_family: str
    log_px: Quantity
    log_px_method: str
    log_px_estimates: dict[str, Quantity]
    elbo_amortized: Quantity
    elbo_local: dict[str, Quantity]
    approximation_gap: dict[str, Quantity]
    amortization_gap: Quantity
    inference_gap: Quantity
    seconds_per_datapoint: dict[str, float]
    settings: dict[str, Any]
    local_fit: dict[str, dict[str, float]] = field(default_factory=dict)
    refinement: dict[str, Quantity] = field(default_factory=dict)
    log_px_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    data_id: str = ""
    per_datapoint: PerDatapoint | None = field(default=None, repr=False)

    def to_dict(self, per_datapoint: bool = True) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_datapoint"}
        out = asdict(GapReport(**out))
        out["per_datapoint"] = (
            self.per_datapoint.to_dict() if per_datapoint and self.per_datapoint else {}
        )
        return out

    def to_json(self, path: str | Path | None = None, per_datapoint: bool = True) -> str:
        text = json.dumps(self.to_dict(per_datapoint), indent=2)
        if path is not None:
            write_atomic(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GapReport:
        """Inverse of :meth:`to_dict` (a report read back from its JSON)."""
        data = dict(data)
        data.setdefault("refinement", {})
        # reports written before refinement existed: no refinement was measured
        data["settings"] = {"refine_kwargs": {}, **data["settings"]}

        def quantities(d):
            return {k: Quantity.from_dict(v) for k, v in d.items()}

        for key in ("log_px", "elbo_amortized", "amortization_gap", "inference_gap"):
            data[key] = Quantity.from_dict(data[key])
        for key in ("log_px_estimates", "elbo_local", "approximation_gap", "refinement"):
            data[key] = quantities(data[key])
        data["per_datapoint"] = PerDatapoint.from_dict(data.get("per_datapoint", {}))
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> GapReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def rows(self, quantity: str) -> Rows:
        """The per-datapoint estimates of a reported quantity, by its name: ``"log_px"``,
        ``"log_px/<estimate>"`` (``iwae``, ``ais``), ``"elbo_amortized"``,
        ``"elbo_local/<family>"``, ``"elbo_refined/<K>"``, ``"approximation_gap/<family>"``,
        ``"amortization_gap"`` or ``"inference_gap"``. (The same rows, by what they
        measured: :attr:`per_datapoint`.)"""
        per = self.per_datapoint
        if per is None:
            raise ValueError("this report holds no per-datapoint arrays (written without them)")
        head, _, tail = quantity.partition("/")
        lookups = {
            "log_px": lambda: per.log_px_estimates[tail] if tail else per.log_px,
            "elbo_amortized": lambda: per.elbo_amortized,
            "elbo_local": lambda: per.elbo_local[tail],
            "elbo_refined": lambda: per.elbo_refined[int(tail)],
            "approximation_gap": lambda: per.approximation_gap(tail),
            "amortization_gap": lambda: per.amortization_gap(self.encoder_family),
            "inference_gap": per.inference_gap,
        }
        try:
            return lookups[head]()
        except (KeyError, ValueError):
            raise ValueError(f"the report has no quantity {quantity!r}") from None

    def values(self, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-datapoint values of a reported quantity (named as in :meth:`rows`) and
        their Monte Carlo errors."""
        rows = self.rows(quantity)
        return rows.value, rows.mc_se

    def quantity(self, name: str) -> Quantity:
        """The reported mean named as in :meth:`rows` (``"amortization_gap"``,
        ``"elbo_local/fullcov"``, ...), with its two errors."""
        head, _, tail = name.partition("/")
        table = {
            "log_px": self.log_px_estimates.get(tail) if tail else self.log_px,
            "elbo_amortized": self.elbo_amortized,
            "elbo_local": self.elbo_local.get(tail),
            "elbo_refined": self.refinement.get(tail),
            "approximation_gap": self.approximation_gap.get(tail),
            "amortization_gap": self.amortization_gap,
            "inference_gap": self.inference_gap,
        }
        found = table.get(head)
        if found is None:
            raise ValueError(f"the report has no quantity {name!r}")
        return found

    def contrast(self, a: str, b: str) -> Quantity:
        """Quantity ``a`` minus quantity ``b`` on this report's datapoints (paired): for
        instance ``contrast("elbo_local/fullcov", "elbo_local/diagonal")``, family against
        family, or ``contrast("elbo_refined/100", "elbo_amortized")``, route against route.
        Both must be estimated from draws of their own (not gaps sharing a log p(x))."""
        return (self.rows(a) - self.rows(b)).mean()

    def convergence_warnings(self) -> list[str]:
        """One line per family whose q* may still move a reported gap by more than its
        stated Monte Carlo error: rows that did not converge, or what more steps would
        still gain."""
        out = []
        for name, stats in self.local_fit.items():
            remaining = stats.get("mean_remaining", 0.0)
            error = self.approximation_gap[name].mc_se
            if name == self.encoder_family:
                error = min(error, self.amortization_gap.mc_se)
            if remaining > error:
                out.append(
                    f"q* ({name}): {stats['converged_fraction']:.0%} of rows converged and more "
                    f"steps would still gain about {remaining:.3f} nats per datapoint, more "
                    f"than the gaps' stated error {error:.3f}: raise local_steps"
                )
        return out

    def tail_warnings(self) -> list[str]:
        """One line per estimate of log p(x) that may be off by more than its stated error:
        rows whose importance weights are too heavy-tailed (Pareto k-hat above its
        threshold) to trust, or more weights that would still raise it."""
        out = []
        for name, stats in self.log_px_weights.items():
            what, advice = _WEIGHTS_OF.get(name, ("weights", "draw more"))
            if stats.get("above", 0) > 0:
                out.append(
                    f"log p(x) by {name}: {stats['above']:.0f} of {self.n} rows have importance "
                    f"weights with Pareto k-hat above {stats['threshold']:.2f} (largest "
                    f"{stats['max']:.2f}), too heavy-tailed for their estimate or its error to "
                    f"be trusted: {advice}"
                )
            remaining, se = stats.get("remaining", 0.0), stats.get("remaining_se", 0.0)
            error = self.log_px_estimates[name].mc_se
            if remaining > max(error, 2 * se):
                out.append(
                    f"log p(x) by {name}: more {what} would still raise it by about "
                    f"{remaining:.3f} ± {se:.3f} nats per datapoint, more than its stated error "
                    f"{error:.3f}: {advice}"
                )
        return out

    def warnings(self) -> list[str]:
        """Everything that says a reported number may be off by more than its error."""
        return self.convergence_warnings() + self.tail_warnings()

    def convergence(self) -> str:
        """A line per family: how many rows converged and what more steps would gain;
        a line per estimate of log p(x): how heavy the tails of its weights are, and what
        more weights would gain."""
        lines = [
            f"q* ({name}): {round(stats['converged_fraction'] * self.n)} of {self.n} rows "
            f"converged in {stats['mean_steps']:.0f} steps on average; more steps would "
            f"gain about {stats.get('mean_remaining', float('nan')):.4f} nats per datapoint"
            for name, stats in self.local_fit.items()
        ]
        for name, stats in self.log_px_weights.items():
            what = _WEIGHTS_OF.get(name, ("weights",))[0]
            if "median" in stats:
                tail = (f"Pareto k-hat of the weights median {stats['median']:.2f}, largest "
                        f"{stats['max']:.2f}, {stats['above']:.0f} of {self.n} rows above "
                        f"{stats['threshold']:.2f}")  # fmt: skip
            else:
                tail = (f"{self.settings['samples'][name]} {what} per row, too few to judge "
                        "their weights' tail (k-hat needs 25); its error assumes a light one")
            gain = ""
            if "remaining" in stats:
                gain = (f"; more {what} would gain about {stats['remaining']:.4f} ± "
                        f"{stats['remaining_se']:.4f} nats per datapoint")
            lines.append(f"log p(x) by {name}: {tail}{gain}")
        return "\n".join(lines)

    def table(self) -> str:
        """The report as a Markdown table: each mean with its Monte Carlo error and its
        sampling error over the n datapoints."""
        fam = self.encoder_family
        others = [name for name in self.elbo_local if name != fam]
        paired = []  # differences on the same datapoints, with their own errors
        per = self.per_datapoint
        if per and {"iwae", "ais"} <= set(per.log_px_estimates):
            ais_iwae = per.log_px_estimates["ais"] - per.log_px_estimates["iwae"]
            paired.append(("log p(x): AIS - IWAE", ais_iwae.mean(),
                           "paired; > 0: IWAE is biased low by at least this"))  # fmt: skip
        if per:
            paired += [(f"L[q*] ({name}) - L[q*] ({fam})",
                        (per.elbo_local[name] - per.elbo_local[fam]).mean(), "paired")
                       for name in others]  # fmt: skip
        rows = [
            ("log p(x)", self.log_px, self.log_px_method),
            *[
                (f"log p(x) by {name}", q, "shown beside the estimate used")
                for name, q in self.log_px_estimates.items()
                if len(self.log_px_estimates) > 1
            ],
            *[(f"L[q*] ({name})", q, "per-datapoint optimisation")
              for name, q in self.elbo_local.items()],  # fmt: skip
            ("L[q] (encoder)", self.elbo_amortized, f"amortized, {fam}"),
            *[
                (f"L[q] after {k} refinement steps", q, "from the encoder's output")
                for k, q in self.refinement.items()
                if k != "0"
            ],
            (f"approximation gap ({fam})", self.approximation_gap[fam], "log p(x) - L[q*]"),
            ("amortization gap", self.amortization_gap, "L[q*] - L[q]"),
            ("inference gap", self.inference_gap, "log p(x) - L[q]"),
            *[(f"approximation gap ({name})", self.approximation_gap[name], "log p(x) - L[q*]")
              for name in others],  # fmt: skip
            *paired,
        ]
        lines = [
            f"| quantity | nats | ± MC s.e. | ± s.e. over the {self.n} datapoints | how |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {a} | {q.mean:.3f} | {q.mc_se:.3f} | {q.data_se:.3f} | {c} |"
                  for a, q, c in rows]  # fmt: skip
        return "\n".join(lines)


def difference(a: GapReport, b: GapReport, quantity: str, *, paired: bool | None = None
               ) -> Quantity:  # fmt: skip
    """``quantity`` of report a minus that of report b, with the errors of the difference.

    Paired where the two were measured on the same datapoints (two models, routes or
    settings on one test set: the mean and errors of the per-datapoint differences);
    unpaired where not (train against test: errors add in quadrature). ``paired=None``
    pairs them when their data digests agree. ``quantity`` names as in
    :meth:`GapReport.rows`.

    Example: ``difference(test, train, "amortization_gap")`` is how much larger the
    amortization gap is on held-out data, with its sampling error over both sets of
    datapoints.
    """
    if paired is None:
        paired = bool(a.data_id) and a.data_id == b.data_id and a.n == b.n
    if paired:
        return (a.rows(quantity) - b.rows(quantity)).mean()
    qa, qb = a.quantity(quantity), b.quantity(quantity)
    return Quantity(qa.mean - qb.mean, math.hypot(qa.mc_se, qb.mc_se),
                    math.hypot(qa.data_se, qb.data_se))  # fmt: skip


def _merged_methods(reports: Sequence[GapReport]) -> dict[str, str]:
    """How each estimate of log p(x) was made over the union of the shards: one
    description, or each with its number of datapoints where the shards chose different
    proposals (each shard draws from its own tightest q*)."""
    out = {}
    for name in reports[0].settings["log_px_methods"]:
        counts: dict[str, int] = {}
        for r in reports:
            method = r.settings["log_px_methods"][name]
            counts[method] = counts.get(method, 0) + r.n
        out[name] = next(iter(counts)) if len(counts) == 1 else "; ".join(
            f"{method} on {n} datapoints" for method, n in counts.items())  # fmt: skip
    return out


def data_digest(x: Tensor) -> str:
    """A short digest of the data's values and shape: equal digests, same datapoints."""
    digest = hashlib.sha256(str((tuple(x.shape), str(x.dtype))).encode())
    digest.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()[:16]


def _weight_summaries(estimates: dict[str, Rows], samples: dict[str, int]
                      ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per estimate of log p(x), what its importance weights say: the k-hat threshold for
    their number (``samples[name]``), how many rows exceed it, the median and largest
    k-hat (left out where too few weights to fit a tail, such as AIS's usual 16 chains),
    and the mean over rows of what more weights would gain, with its standard error."""
    out = {}
    for name, rows in estimates.items():
        stats = {}
        khat = np.asarray([] if rows.khat is None else rows.khat, dtype=np.float64)
        if khat.size and not np.isnan(khat).all():
            threshold = khat_threshold(samples.get(name, 0))
            stats.update(threshold=threshold, above=float((khat > threshold).sum()),
                         median=float(np.nanmedian(khat)), max=float(np.nanmax(khat)))  # fmt: skip
        gain = np.asarray([] if rows.remaining is None else rows.remaining, dtype=np.float64)
        if gain.size > 1 and np.isfinite(gain).all():
            stats.update(remaining=float(gain.mean()),
                         remaining_se=float(gain.std(ddof=1) / math.sqrt(gain.size)))  # fmt: skip
        if stats:
            out[name] = stats
    return out


def _summarise(
    per: PerDatapoint,
    *,
    encoder_family: str,
    estimates: dict[str, str],
    seconds: dict[str, float],
    settings: dict[str, Any],
    local_fit: dict[str, dict[str, float]],
    data_id: str,
) -> GapReport:
    """A report's means and gaps from its per-datapoint estimates; ``estimates`` describes
    each estimate of log p(x)."""
    families = list(per.elbo_local)
    return GapReport(
        n=len(per.log_px),
        encoder_family=encoder_family,
        log_px=per.log_px.mean(),
        log_px_method=estimates[per.log_px_chosen],
        log_px_estimates={name: rows.mean() for name, rows in per.log_px_estimates.items()},
        elbo_amortized=per.elbo_amortized.mean(),
        elbo_local={name: rows.mean() for name, rows in per.elbo_local.items()},
        approximation_gap={name: per.approximation_gap(name).mean() for name in families},
        amortization_gap=per.amortization_gap(encoder_family).mean(),
        inference_gap=per.inference_gap().mean(),
        seconds_per_datapoint=seconds,
        settings=settings,
        local_fit=local_fit,
        refinement={str(k): rows.mean() for k, rows in sorted(per.elbo_refined.items())},
        log_px_weights=_weight_summaries(per.log_px_estimates, settings.get("samples", {})),
        data_id=data_id,
        per_datapoint=per,
    )


def merge_reports(reports: Sequence[GapReport]) -> GapReport:
    """One report for the union of the datapoints of ``reports`` (shards of one dataset).

    The result is what one :func:`gap_report` over all the datapoints reports, up to the
    Monte Carlo draws: means, gaps and standard errors are recomputed from the
    per-datapoint arrays, and log p(x) uses the estimate that is tighter over the union.
    The shards must have been measured alike (same settings and estimators); times per
    datapoint and fit statistics are averaged with the shards' sizes as weights.
    """
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    first = reports[0]

    def alike(r: GapReport) -> tuple:  # which q* each estimate drew from may differ
        settings = {k: v for k, v in r.settings.items() if k != "log_px_methods"}
        return r.encoder_family, settings, list(r.elbo_local), list(r.settings["log_px_methods"])

    if any(alike(r) != alike(first) for r in reports[1:]):
        raise ValueError("reports to merge were measured differently (settings, families or "
                         "estimates of log p(x))")  # fmt: skip
    parts = [r.per_datapoint for r in reports]
    if any(p is None for p in parts):
        raise ValueError("reports to merge need their per-datapoint arrays")
    if len({(tuple(p.log_px_estimates), tuple(p.elbo_refined)) for p in parts}) > 1:
        raise ValueError("reports to merge hold different per-datapoint arrays")
    data_id = first.data_id  # of one report; of several, a digest of their digests in order
    if len(reports) > 1:
        data_id = hashlib.sha256(" ".join(r.data_id for r in reports).encode()).hexdigest()[:16]
    n = sum(r.n for r in reports)

    def weighted(values: list[dict[str, float]]) -> dict[str, float]:
        return {k: sum(r.n * v[k] for r, v in zip(reports, values, strict=True)) / n
                for k in values[0]}  # fmt: skip

    methods = _merged_methods(reports)
    return _summarise(
        PerDatapoint.cat(parts),
        encoder_family=first.encoder_family,
        estimates=methods,
        seconds=weighted([r.seconds_per_datapoint for r in reports]),
        settings={**first.settings, "log_px_methods": methods},
        local_fit={f: weighted([r.local_fit[f] for r in reports]) for f in first.local_fit},
        data_id=data_id,
    )
