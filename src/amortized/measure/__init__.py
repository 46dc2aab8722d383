"""Measurements of what inference costs: the gap report, AIS, collapse diagnostics.

- ``gaps``: the inference-gap decomposition of Cremer, Li & Duvenaud (2018);
- ``report``: what a gap report holds (means with two errors, rows by what they measured);
- ``ais``: annealed importance sampling and bidirectional Monte Carlo;
- ``diagnostics``: KL per dimension, active units, I(x; z).
"""

from .ais import AISResult, ais, bdmc, reverse_ais
from .gaps import gap_report
from .report import GapReport, PerDatapoint, Quantity, Rows, difference, merge_reports

__all__ = ["AISResult", "ais", "bdmc", "reverse_ais", "GapReport", "PerDatapoint", "Quantity",
           "Rows", "difference", "gap_report", "merge_reports"]  # fmt: skip
