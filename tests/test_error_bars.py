"""The two kinds of error a gap report states, and the errors of differences.

- Calibration: over repeated reports (new draws, same datapoints) on a case with
  heavy-tailed importance weights, the spread of log p(x) and of the gaps matches the
  stated Monte Carlo error.
- Sampling error over datapoints: the standard deviation of the per-datapoint values over
  sqrt(n), far larger than the Monte Carlo error on these models.
- Differences: paired on the same datapoints (against a closed form), unpaired across
  data, and chosen by the reports' data digests.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from linear_gaussian import LinearGaussian
from test_gaps import ShrunkPosteriorEncoder, inference_gap_closed_form
from torch.distributions import MultivariateNormal, kl_divergence

from amortized import DiagonalGaussian, GapReport, gap_report
from amortized.measure.report import Quantity, difference

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def heavy_tailed_model() -> LinearGaussian:
    """Two latents with posterior correlation 0.55: the best diagonal q is narrow along
    the correlation, so IWAE's weights from it have a tail of shape ~0.55 (median k-hat
    0.52 at k = 2,000): variance barely finite, but below the trust threshold."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 1, generator=g, dtype=DTYPE)
    weight = torch.cat([w, w + 0.4 * torch.randn(5, 1, generator=g, dtype=DTYPE)], dim=1)
    return LinearGaussian.from_weights(weight, torch.zeros(5, dtype=DTYPE), scale=1.0)


def _report(lg, x, seed, shrink=0.7, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gap_report(lg.model, x, ShrunkPosteriorEncoder(lg, shrink),
                          DiagonalGaussian(lg.latent_dim),
                          iwae_k=2000, elbo_samples=500, seed=seed, **kwargs)  # fmt: skip


def test_stated_monte_carlo_errors_match_the_spread_over_repeats():
    lg = heavy_tailed_model()
    x = lg.sample_x(20)
    reports = [_report(lg, x, seed) for seed in range(48)]
    khat = [r.log_px_weights["iwae"] for r in reports]  # heavy-tailed, yet mostly trustworthy
    assert np.median([k["median"] for k in khat]) > 0.4
    assert sum(k["above"] for k in khat) < 0.1 * 20 * len(reports)
    for name, get in {
        "log p(x)": lambda r: r.log_px,
        "approximation gap": lambda r: r.approximation_gap["diagonal"],
        "amortization gap": lambda r: r.amortization_gap,
    }.items():
        means = np.array([get(r).mean for r in reports])
        stated = math.sqrt(np.mean([get(r).mc_se ** 2 for r in reports]))
        assert abs(means.std(ddof=1) / stated - 1) < 0.25, name
    # the Monte Carlo error says nothing about other datapoints: the spread across
    # datapoints is larger, and stated apart
    r = reports[0]
    assert r.amortization_gap.data_se > 2 * r.amortization_gap.mc_se
    values, _ = r.values("amortization_gap")
    assert r.amortization_gap.data_se == pytest.approx(values.std(ddof=1) / math.sqrt(20))


@pytest.fixture(scope="module")
def two_encoders(single_thread):
    lg = LinearGaussian(scale=1.0, seed=2)
    x = lg.sample_x(40)
    return lg, x, _report(lg, x, 0, shrink=0.7), _report(lg, x, 1, shrink=0.9)


def test_a_paired_difference_on_the_same_datapoints_matches_the_closed_form(two_encoders):
    lg, x, a, b = two_encoders
    assert a.data_id == b.data_id
    d = difference(b, a, "elbo_amortized")  # paired: the same datapoints
    # L[q] = log p(x) - KL(q || posterior): the gain is the fall in KL, per datapoint
    mean, cov = lg.posterior(x)
    q9 = MultivariateNormal(0.9 * mean, torch.eye(3, dtype=DTYPE))
    exact_gain = inference_gap_closed_form(lg, x) - kl_divergence(q9, MultivariateNormal(mean, cov))
    assert abs(d.mean - float(exact_gain.mean())) < 4 * d.mc_se
    # the spread of the estimated differences holds their Monte Carlo noise as well
    exact_se = float(exact_gain.std()) / math.sqrt(40)
    assert 0.9 * exact_se < d.data_se < 1.1 * math.hypot(exact_se, d.mc_se)
    unpaired = difference(b, a, "elbo_amortized", paired=False)
    assert unpaired.mean == pytest.approx(d.mean)
    assert unpaired.mc_se == pytest.approx(d.mc_se, rel=1e-9)  # independent draws either way
    # the two encoders' bounds move together across datapoints: pairing removes that
    assert unpaired.data_se > 5 * d.data_se
    assert unpaired.data_se == pytest.approx(
        math.hypot(a.elbo_amortized.data_se, b.elbo_amortized.data_se)
    )


def test_reports_on_different_data_are_compared_unpaired(two_encoders):
    lg, x, a, _ = two_encoders
    other = _report(lg, lg.sample_x(30, seed=7), 2)
    assert other.data_id != a.data_id
    d = difference(other, a, "amortization_gap")
    assert d.mean == pytest.approx(other.amortization_gap.mean - a.amortization_gap.mean)
    assert d.data_se == pytest.approx(
        math.hypot(other.amortization_gap.data_se, a.amortization_gap.data_se)
    )
    with pytest.raises(ValueError, match="same datapoints"):
        difference(other, a, "amortization_gap", paired=True)
    with pytest.raises(ValueError, match="no quantity"):
        difference(other, a, "elbo_local/fullcov")


def test_contrasts_within_a_report_are_paired(two_encoders):
    _, _, a, _ = two_encoders
    d = a.contrast("elbo_local/diagonal", "elbo_amortized")
    assert d.mean == pytest.approx(a.amortization_gap.mean)
    assert d.data_se == pytest.approx(a.amortization_gap.data_se)
    assert d.mc_se == pytest.approx(a.amortization_gap.mc_se)


def test_reports_written_before_the_two_errors_read_back(two_encoders):
    _, _, a, _ = two_encoders
    data = a.to_dict()
    for key in ("log_px", "elbo_amortized", "amortization_gap", "inference_gap"):
        data[key] = {"mean": data[key]["mean"], "stderr": data[key]["mc_se"]}
    for key in ("log_px_weights", "data_id"):
        del data[key]
    old = GapReport.from_dict(data)
    assert old.amortization_gap.mc_se == a.amortization_gap.mc_se
    assert math.isnan(old.amortization_gap.data_se)
    assert old.data_id == "" and old.log_px_weights == {}
    assert str(Quantity(1.0, 0.01, 0.5)) == "1.000 ± 0.010 [± 0.500]"
