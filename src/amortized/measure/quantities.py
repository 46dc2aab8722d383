r"""The numbers a gap report is made of: means with their two errors, and rows of
per-datapoint estimates held by what they measured.

A :class:`Quantity` is a mean over datapoints with its Monte Carlo error and its
sampling error over datapoints. :class:`Rows` are the per-datapoint estimates behind
one mean, with their Monte Carlo errors; subtracting two gives the paired difference
on the same datapoints. :class:`PerDatapoint` holds every row of a report: L[q] at the
encoder's output and after K refinement steps, L[q*] of each family, each estimate of
log p(x); the gaps are differences of these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PerDatapoint", "Quantity", "Rows"]


@dataclass
class Quantity:
    """A mean over n datapoints, in nats, with its two standard errors.

    ``mc_se`` is the Monte Carlo error: how far the mean would move if every estimate
    were drawn again on the same datapoints. ``data_se`` is the sampling error over
    datapoints, the standard deviation of the per-datapoint values over sqrt(n): how far
    it would move on n other datapoints from the same distribution. Two models or routes
    measured on the same datapoints differ by their paired difference, whose errors
    :func:`difference` gives; a mean on one split against a mean on another needs both.
    Printed as ``mean ± mc_se [± data_se]``.
    """

    mean: float
    mc_se: float
    data_se: float = math.nan

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.mc_se:.3f} [± {self.data_se:.3f}]"

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Quantity:
        if "stderr" in d:  # reports written before the two errors were told apart
            return cls(d["mean"], d["stderr"])
        return cls(**d)


@dataclass
class Rows:
    """One estimate per datapoint, ``(n,)``, with its Monte Carlo error per datapoint.

    An estimate of log p(x) also carries, per row, its importance weights' Pareto k-hat
    (``khat``) and what more weights would still gain (``remaining``;
    :mod:`amortized.weights`). ``a - b`` is the paired difference of two estimates drawn
    independently on the same datapoints; ``mean()`` the mean over datapoints with its two
    errors.
    """

    value: np.ndarray
    mc_se: np.ndarray
    khat: np.ndarray | None = None
    remaining: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("value", "mc_se", "khat", "remaining"):
            v = getattr(self, name)
            if isinstance(v, Tensor):
                setattr(self, name, v.detach().cpu().numpy())
            elif v is not None:
                setattr(self, name, np.asarray(v))

    def __len__(self) -> int:
        return self.value.size

    def mean(self) -> Quantity:
        return _quantity(self.value, self.mc_se)

    def __sub__(self, other: Rows) -> Rows:
        if self.value.shape != other.value.shape:
            raise ValueError(f"paired quantities need the same datapoints, got "
                             f"{len(self)} and {len(other)}")  # fmt: skip
        return Rows(self.value - other.value, np.hypot(self.mc_se, other.mc_se))

    def to_dict(self) -> dict[str, list[float]]:
        return {name: v.tolist() for name, v in vars(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Rows:
        return cls(**{name: np.asarray(v) for name, v in d.items()})

    @classmethod
    def cat(cls, parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts`` one after another."""
        def joined(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else np.concatenate(values)

        return cls(*(joined(name) for name in ("value", "mc_se", "khat", "remaining")))


@dataclass
class PerDatapoint:
    """Every per-datapoint estimate behind a report's means, held by what it measured.

    ``elbo_amortized`` is L[q] at the encoder's output; ``elbo_refined[K]`` L[q] after K
    refinement steps from it; ``elbo_local[family]`` L[q*] of each family optimised per
    datapoint; ``log_px_estimates[name]`` each estimate of log p(x) (``"iwae"``,
    ``"ais"``), of which the report uses ``log_px_chosen``, the tighter on average. The
    gaps are differences of these rows.
    """

    elbo_amortized: Rows
    elbo_local: dict[str, Rows]
    log_px_estimates: dict[str, Rows]
    log_px_chosen: str
    elbo_refined: dict[int, Rows] = field(default_factory=dict)

    @property
    def log_px(self) -> Rows:
        return self.log_px_estimates[self.log_px_chosen]

    def approximation_gap(self, family: str) -> Rows:
        """log p(x) - L[q*] of ``family``."""
        return self.log_px - self.elbo_local[family]

    def amortization_gap(self, family: str) -> Rows:
        """L[q*] - L[q], with q* in ``family``, the encoder's family."""
        return self.elbo_local[family] - self.elbo_amortized

    def inference_gap(self) -> Rows:
        """log p(x) - L[q]."""
        return self.log_px - self.elbo_amortized

    def to_dict(self) -> dict[str, Any]:
        def each(rows: dict) -> dict[str, Any]:
            return {str(k): r.to_dict() for k, r in rows.items()}

        return {"elbo_amortized": self.elbo_amortized.to_dict(),
                "elbo_refined": each(self.elbo_refined), "elbo_local": each(self.elbo_local),
                "log_px_estimates": each(self.log_px_estimates),
                "log_px_chosen": self.log_px_chosen}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerDatapoint | None:
        """Inverse of :meth:`to_dict`; None for a report written without its arrays."""
        if not d:
            return None
        if "elbo_amortized_se" in d:
            return _from_flat(d)

        def each(rows: dict, key=str) -> dict:
            return {key(k): Rows.from_dict(r) for k, r in rows.items()}

        return cls(elbo_amortized=Rows.from_dict(d["elbo_amortized"]),
                   elbo_local=each(d["elbo_local"]),
                   log_px_estimates=each(d["log_px_estimates"]),
                   log_px_chosen=d["log_px_chosen"],
                   elbo_refined=each(d["elbo_refined"], int))  # fmt: skip

    @classmethod
    def cat(cls, parts: Sequence[PerDatapoint]) -> PerDatapoint:
        """The datapoints of ``parts`` one after another (shards measured alike); log p(x)
        by the estimate that is tighter over all of them."""
        first = parts[0]

        def each(name: str) -> dict:
            return {k: Rows.cat([getattr(p, name)[k] for p in parts]) for k in getattr(first, name)}

        estimates = each("log_px_estimates")
        return cls(elbo_amortized=Rows.cat([p.elbo_amortized for p in parts]),
                   elbo_local=each("elbo_local"), log_px_estimates=estimates,
                   log_px_chosen=_tighter(estimates),
                   elbo_refined=each("elbo_refined"))  # fmt: skip


def _tighter(estimates: dict[str, Rows]) -> str:
    """The estimate of log p(x) with the higher mean: every one is a lower bound."""
    return max(estimates, key=lambda m: float(torch.as_tensor(estimates[m].value).mean()))


def _from_flat(per: dict[str, list[float]]) -> PerDatapoint:
    """A report's arrays as written before they were held by what they measured: one
    flat mapping from ``"elbo_local/<family>"``, ``"log_px_<estimate>"`` and the like
    (with ``_se``, ``_khat``, ``_remaining`` suffixes) to lists."""

    def rows(key: str) -> Rows:
        extra = {s: per[f"{key}_{s}"] for s in ("khat", "remaining") if f"{key}_{s}" in per}
        return Rows.from_dict({"value": per[key], "mc_se": per[f"{key}_se"], **extra})

    def named(prefix: str) -> list[str]:
        suffixes = ("_se", "_khat", "_remaining")
        return [k[len(prefix):] for k in per
                if k.startswith(prefix) and not k.endswith(suffixes)]  # fmt: skip

    estimates = {name: rows(f"log_px_{name}") for name in named("log_px_")}
    chosen = next(m for m, r in estimates.items()
                  if np.array_equal(r.value, per["log_px"], equal_nan=True))
    return PerDatapoint(
        elbo_amortized=rows("elbo_amortized"),
        elbo_local={name: rows(f"elbo_local/{name}") for name in named("elbo_local/")},
        log_px_estimates=estimates,
        log_px_chosen=chosen,
        elbo_refined={int(k): rows(f"elbo_refined/{k}") for k in named("elbo_refined/")},
    )


def _quantity(values: Tensor | np.ndarray, mc_se: Tensor | np.ndarray) -> Quantity:
    """Mean over datapoints; the MC errors of independent per-datapoint estimates add;
    the sampling error is the values' standard deviation over sqrt(n)."""
    values = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64)
    mc_se = np.asarray(torch.as_tensor(mc_se).detach().cpu(), dtype=np.float64)
    n = values.size
    data_se = values.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
    return Quantity(float(values.mean()), float(np.sqrt(np.square(mc_se).sum()) / n),
                    float(data_se))  # fmt: skip
