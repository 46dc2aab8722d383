"""Tests of amortized.weights: log mean weight, its error, and the Pareto k-hat of the tail.

The references are exact: for a target N(0, 1) and a proposal N(0, s^2) with s < 1, the
weight w = p / q has P(w > t) ~ t^(-1 / (1 - s^2)), a Pareto tail of shape k = 1 - s^2
(finite variance only for k < 1/2); for s > 1 the weights are bounded (k < 0). Draws from
a generalized Pareto of known shape come from its inverse CDF.
"""

from __future__ import annotations

import math

import pytest
import torch
from linear_gaussian import LinearGaussian

from amortized import DiagonalGaussian, iwae_bound
from amortized.estimators import iwae_estimate
from amortized.weights import LogMeanWeight, khat_threshold, pareto_khat, tail_size

DTYPE = torch.float64


def narrow_proposal_log_weights(s2: float, samples: int, rows: int, seed: int = 0):
    """log N(z; 0, 1) - log N(z; 0, s2) for z ~ N(0, s2): ``(samples, rows)``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, rows, generator=g, dtype=DTYPE) * math.sqrt(s2)
    return -0.5 * z.square() * (1 - 1 / s2) + 0.5 * math.log(s2)


@pytest.mark.parametrize("s2", [0.8, 0.6, 0.4])
def test_khat_finds_the_tail_shape_of_a_narrow_proposal(s2):
    weights = LogMeanWeight(5000)
    weights.add(narrow_proposal_log_weights(s2, 5000, 40))
    khat = weights.result().khat
    assert abs(float(khat.median()) - (1 - s2)) < 0.08


def test_bounded_weights_have_negative_khat_and_equal_weights_no_tail():
    weights = LogMeanWeight(5000)
    weights.add(narrow_proposal_log_weights(1.5, 5000, 20))  # proposal wider than the target
    assert (weights.result().khat < 0).all()
    equal = LogMeanWeight(100)
    equal.add(torch.zeros(100, 3, dtype=DTYPE))
    result = equal.result()
    assert torch.equal(result.khat, torch.full((3,), -math.inf, dtype=DTYPE))
    assert torch.equal(result.stderr, torch.zeros(3, dtype=DTYPE))
    few = LogMeanWeight(16)  # too few weights to fit a tail: no k-hat
    few.add(torch.randn(16, 3, dtype=DTYPE))
    assert few.result().khat.isnan().all()


@pytest.mark.parametrize("shape", [0.2, 0.5, 0.9])
def test_pareto_khat_recovers_the_shape_of_generalized_pareto_draws(shape):
    g = torch.Generator().manual_seed(1)
    u = torch.rand(30, 2000, generator=g, dtype=DTYPE)
    draws = 2.0 / shape * ((1 - u) ** -shape - 1)  # GPD(sigma 2, k), inverse CDF
    khat = pareto_khat(draws.sort(-1).values)
    assert abs(float(khat.median()) - shape) < 0.05
    assert float(khat.std()) < 0.1


def test_chunked_accumulation_equals_one_pass():
    log_w = narrow_proposal_log_weights(0.5, 3000, 7)
    one, chunked = LogMeanWeight(3000), LogMeanWeight(3000)
    one.add(log_w)
    for chunk in log_w.split(37):
        chunked.add(chunk)
    a, b = one.result(), chunked.result()
    torch.testing.assert_close(a.log_px, b.log_px, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-9, atol=0)
    assert torch.equal(a.khat, b.khat)  # the same tail, whatever the chunks
    exact = torch.logsumexp(log_w, 0) - math.log(3000)
    torch.testing.assert_close(a.log_px, exact, rtol=0, atol=1e-12)
    short = LogMeanWeight(3000)
    short.add(log_w[:10])
    with pytest.raises(ValueError, match="expected 3000 weights"):
        short.result()


def test_thresholds_and_tail_sizes_follow_vehtari_et_al():
    assert tail_size(5000) == math.ceil(3 * math.sqrt(5000))
    assert tail_size(100) == 20  # 0.2 S for small S
    assert khat_threshold(5000) == 0.7
    assert khat_threshold(100) == pytest.approx(0.5)


def test_the_delta_method_error_matches_the_spread_where_khat_is_small():
    """Over 400 repeats, the stated error of log mean(w) against its real spread: within
    10% for light tails (k = 0.2) and moderately heavy ones (k = 0.4)."""
    for s2 in (0.8, 0.6):
        log_w = narrow_proposal_log_weights(s2, 2000, 400, seed=3)
        weights = LogMeanWeight(2000)
        weights.add(log_w)
        est = weights.result()
        assert abs(float(est.log_px.mean())) < 4 * float(est.log_px.std()) / 20  # log p = 0
        stated = float(est.stderr.square().mean().sqrt())
        assert abs(stated / float(est.log_px.std()) - 1) < 0.1, s2


def test_iwae_estimate_is_iwae_bound_with_diagnostics(best_diagonal_lam):
    lg = LinearGaussian()
    x = lg.sample_x(6)
    lam = best_diagonal_lam(lg, x)
    family = DiagonalGaussian(3)
    torch.manual_seed(4)
    value, se = iwae_bound(lg.model, family, lam, x, k=500, stderr=True, chunk_size=64)
    torch.manual_seed(4)
    est = iwae_estimate(lg.model, family, lam, x, k=500, chunk_size=64)
    assert torch.equal(est.log_px, value.detach())
    assert torch.equal(est.stderr, se.detach())
    assert est.khat.shape == (6,) and est.khat.isfinite().all()
    assert est.samples == 500


@pytest.mark.parametrize("s2, d, samples", [(2.5, 4, 64), (3.0, 6, 32)])
def test_what_more_weights_would_gain_matches_the_estimate_s_shortfall(s2, d, samples):
    """A proposal wider than the target (light tails, finite variance): the estimate's
    shortfall below log p(x) = 0 shrinks as 1/S, and (L_S - L_{S/4}) / 3 measures it."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(samples, 20000, d, generator=g, dtype=DTYPE) * math.sqrt(s2)
    log_w = (-0.5 * z.square() * (1 - 1 / s2)).sum(-1) + 0.5 * d * math.log(s2)
    weights = LogMeanWeight(samples)
    for chunk in log_w.split(samples // 4 + 3):  # chunks that straddle the first quarter
        weights.add(chunk)
    est = weights.result()
    shortfall, remaining = -float(est.log_px.mean()), float(est.remaining.mean())
    assert shortfall > 0.01  # a shortfall large enough to measure
    assert abs(remaining / shortfall - 1) < 0.2
    few = LogMeanWeight(3)
    few.add(log_w[:3])
    assert few.result().remaining.isnan().all()  # no quarter to compare with
