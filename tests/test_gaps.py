"""Tests of amortized.measure.gaps: the gap decomposition against linear-Gaussian closed forms.

The encoder is deliberately poor, q(z | x) = N(0.7 m(x), I) with m(x) the exact posterior
mean, so every gap has a closed form: the inference gap is KL(q || p(z | x)), the
approximation gap of the diagonal family is 1/2 (sum log Lambda_ii - log det Lambda), that
of the full-covariance family is 0, and the amortization gap is their difference.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from linear_gaussian import LinearGaussian
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from amortized import (
    DiagonalGaussian,
    FullCovarianceGaussian,
    GapReport,
    elbo,
    gap_report,
    merge_reports,
)

DTYPE = torch.float64
N = 40

pytestmark = pytest.mark.usefixtures("single_thread")


class ShrunkPosteriorEncoder(nn.Module):
    """x -> [0.7 m(x), 0]: DiagonalGaussian parameters of N(0.7 m(x), I)."""

    def __init__(self, lg: LinearGaussian, shrink: float = 0.7):
        super().__init__()
        self.lg, self.shrink = lg, shrink

    def forward(self, x):
        mean, _ = self.lg.posterior(x)  # (batch, D)
        return torch.cat([self.shrink * mean, torch.zeros_like(mean)], dim=-1)  # (batch, 2D)


@pytest.fixture(scope="module")
def setup(single_thread):
    lg = LinearGaussian(scale=1.0, seed=2)  # diagonal gap 0.191 nats
    x = lg.sample_x(N)
    encoder = ShrunkPosteriorEncoder(lg)
    lg.model.train()
    encoder.train()
    torch.manual_seed(0)
    report = gap_report(
        lg.model,
        x,
        encoder,
        DiagonalGaussian(3),
        families=[FullCovarianceGaussian(3)],
        iwae_k=2000,
        elbo_samples=10_000,
        batch_size=16,
    )
    return lg, x, encoder, report


def inference_gap_closed_form(lg, x):
    """KL(N(0.7 m, I) || N(m, S)) for each row, ``(n,)``: log p(x) - L[q]."""
    mean, cov = lg.posterior(x)
    q = MultivariateNormal(0.7 * mean, torch.eye(3, dtype=DTYPE))
    return kl_divergence(q, MultivariateNormal(mean, cov))


def test_amortization_gap_is_clearly_positive_and_matches_closed_form(setup):
    lg, x, _, report = setup
    expected = float(inference_gap_closed_form(lg, x).mean()) - lg.diagonal_gap()
    assert report.amortization_gap.mean > 0.5
    assert abs(report.amortization_gap.mean - expected) < 0.05
    assert 0 < report.amortization_gap.mc_se < 0.012  # tolerance 0.05 is > 4 s.e.


def test_approximation_gaps_match_closed_forms(setup):
    lg, _, _, report = setup
    assert set(report.approximation_gap) == {"diagonal", "fullcov"}
    assert abs(report.approximation_gap["diagonal"].mean - lg.diagonal_gap()) < 0.05
    assert abs(report.approximation_gap["fullcov"].mean) < 0.05
    # the two are told apart: the diagonal gap is 0.19 nats
    gaps = report.approximation_gap
    assert gaps["diagonal"].mean > gaps["fullcov"].mean + 0.1


def test_inference_gap_and_amortized_elbo_match_closed_forms(setup):
    lg, x, _, report = setup
    kl = inference_gap_closed_form(lg, x)
    assert abs(report.inference_gap.mean - float(kl.mean())) < 0.05
    l_q = torch.as_tensor(report.per_datapoint.elbo_amortized.value)
    se = torch.as_tensor(report.per_datapoint.elbo_amortized.mc_se)
    exact = lg.log_px(x) - kl
    assert ((l_q - exact).abs() < 4.5 * se).all()


def test_log_px_matches_exact(setup):
    lg, x, _, report = setup
    exact = lg.log_px(x)
    assert abs(report.log_px.mean - float(exact.mean())) < 0.05
    # IWAE's proposal is the fitted diagonal q*, narrower than the posterior, so its
    # weights are heavy-tailed and a rare point overshoots (by up to 0.25 nats in 1 seed of
    # 12); bound the bulk instead. Over 12 seeds the 90% quantile of |error| was 0.03..0.04.
    error = (torch.as_tensor(report.per_datapoint.log_px.value) - exact).abs()
    assert float(error.quantile(0.9)) < 0.06
    assert float(error.median()) < 0.03
    assert "k=2000" in report.log_px_method


def test_gaps_add_up(setup):
    _, _, _, report = setup
    total = report.approximation_gap["diagonal"].mean + report.amortization_gap.mean
    assert math.isclose(total, report.inference_gap.mean, rel_tol=0, abs_tol=1e-9)
    per = report.per_datapoint
    np.testing.assert_allclose(
        per.approximation_gap("diagonal").value + per.amortization_gap("diagonal").value,
        per.inference_gap().value,
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_allclose(per.log_px.value.mean(), report.log_px.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(per.elbo_local["fullcov"].value.mean(),
                               report.elbo_local["fullcov"].mean, rtol=0, atol=1e-6)  # fmt: skip
    # the standard error of a mean of independent estimates: sqrt(sum se_i^2) / n
    se = np.sqrt(per.log_px.mc_se.astype(np.float64) ** 2 + per.elbo_amortized.mc_se ** 2)
    np.testing.assert_allclose(report.inference_gap.mc_se, np.sqrt((se**2).sum()) / N)


def test_per_datapoint_arrays(setup):
    _, _, _, report = setup
    assert report.n == N
    per = report.per_datapoint
    assert set(per.elbo_local) == {"diagonal", "fullcov"}
    assert set(per.log_px_estimates) == {"iwae"} and per.log_px_chosen == "iwae"
    assert per.elbo_refined == {}
    every = [("elbo_amortized", per.elbo_amortized),
             *[(f"elbo_local/{k}", r) for k, r in per.elbo_local.items()],
             ("log_px/iwae", per.log_px_estimates["iwae"])]  # fmt: skip
    for name, rows in every:
        arrays = [rows.value, rows.mc_se]
        if name.startswith("log_px"):
            arrays += [rows.khat, rows.remaining]
        else:
            assert rows.khat is None and rows.remaining is None, name
        for values in arrays:
            assert isinstance(values, np.ndarray), name
            assert values.shape == (N,), name
            assert np.isfinite(values).all(), name
        assert (rows.mc_se > 0).all(), name
        assert report.rows(name) is rows
        np.testing.assert_array_equal(report.values(name)[0], rows.value)


def test_to_json_round_trips(setup, tmp_path):
    _, _, _, report = setup
    data = json.loads(report.to_json())
    expected_keys = {
        "n",
        "encoder_family",
        "log_px",
        "log_px_method",
        "log_px_estimates",
        "elbo_amortized",
        "elbo_local",
        "approximation_gap",
        "amortization_gap",
        "inference_gap",
        "seconds_per_datapoint",
        "settings",
        "local_fit",
        "refinement",
        "log_px_weights",
        "data_id",
        "per_datapoint",
    }
    assert set(data) == expected_keys
    assert data["n"] == N
    assert data["encoder_family"] == "diagonal"
    assert data["amortization_gap"] == {
        "mean": report.amortization_gap.mean,
        "mc_se": report.amortization_gap.mc_se,
        "data_se": report.amortization_gap.data_se,
    }
    assert data["approximation_gap"]["fullcov"]["mean"] == report.approximation_gap["fullcov"].mean
    assert data["settings"]["iwae_k"] == 2000
    assert data["settings"]["elbo_samples"] == 10_000
    stored = data["per_datapoint"]
    assert stored["log_px_chosen"] == "iwae"
    assert stored["log_px_estimates"]["iwae"]["value"] == report.per_datapoint.log_px.value.tolist()
    assert set(stored["elbo_local"]) == {"diagonal", "fullcov"}
    path = tmp_path / "report.json"
    assert report.to_json(path) == path.read_text()
    assert json.loads(report.to_json(per_datapoint=False))["per_datapoint"] == {}
    back = GapReport.from_json(path)
    assert back.to_dict() == report.to_dict()
    # a report written before refinement existed reads as one with no refinement, and
    # merges with newer ones
    old = json.loads(path.read_text())
    del old["settings"]["refine_kwargs"], old["refinement"]
    older = GapReport.from_dict(old)
    assert older.settings == report.settings and older.refinement == {}
    assert merge_reports([older, back]).n == 2 * report.n
    # a report whose arrays were written flat, by name, reads as the same arrays
    per = report.per_datapoint
    flat = {"log_px": per.log_px.value.tolist(), "log_px_se": per.log_px.mc_se.tolist()}
    for name, rows in [("elbo_amortized", per.elbo_amortized),
                       *[(f"elbo_local/{k}", r) for k, r in per.elbo_local.items()],
                       *[(f"log_px_{k}", r) for k, r in per.log_px_estimates.items()]]:
        suffix = {"value": "", "mc_se": "_se", "khat": "_khat", "remaining": "_remaining"}
        flat |= {f"{name}{suffix[k]}": v for k, v in rows.to_dict().items()}
    flat_report = GapReport.from_dict({**json.loads(path.read_text()), "per_datapoint": flat})
    assert flat_report.to_dict() == report.to_dict()


def test_merging_shards_is_the_report_of_their_union(setup):
    lg, x, encoder, report = setup
    # one report re-summarised from its own per-datapoint arrays is the same report
    assert merge_reports([report]).to_dict() == report.to_dict()
    shards = []
    for part in (x[:15], x[15:]):
        torch.manual_seed(3)
        shards.append(gap_report(lg.model, part, encoder, DiagonalGaussian(3),
                                 families=[FullCovarianceGaussian(3)], iwae_k=200,
                                 elbo_samples=500, batch_size=16))  # fmt: skip
    merged = merge_reports(shards)
    def joined(quantity):
        return np.concatenate([s.values(quantity)[0] for s in shards])

    assert merged.n == N
    assert merged.log_px.mean == pytest.approx(joined("log_px").mean())
    assert merged.amortization_gap.mean == pytest.approx(
        (joined("elbo_local/diagonal") - joined("elbo_amortized")).mean()
    )
    fullcov_se = np.concatenate([s.per_datapoint.elbo_local["fullcov"].mc_se for s in shards])
    se = np.sqrt((fullcov_se.astype(np.float64) ** 2).sum()) / N
    assert merged.elbo_local["fullcov"].mc_se == pytest.approx(se)
    sizes = np.array([15, 25])
    expected = (sizes * [s.seconds_per_datapoint["encoder"] for s in shards]).sum() / N
    assert merged.seconds_per_datapoint["encoder"] == pytest.approx(expected)
    # and it agrees with the full report within Monte Carlo error (different draws)
    gap = merged.amortization_gap
    assert abs(gap.mean - report.amortization_gap.mean) < 0.15
    with pytest.raises(ValueError, match="measured differently"):
        merge_reports([shards[0], report])
    # shards whose log p(x) drew from different q* merge, saying which on how many
    other = GapReport.from_dict(shards[1].to_dict())
    other.settings["log_px_methods"] = {"iwae": "IWAE, k=200, proposal q* (diagonal)"}
    mixed = merge_reports([shards[0], other])
    assert mixed.log_px.mean == pytest.approx(merged.log_px.mean)
    assert mixed.log_px_method == (f"{shards[0].log_px_method} on 15 datapoints; IWAE, "
                                   "k=200, proposal q* (diagonal) on 25 datapoints")  # fmt: skip
    with pytest.raises(ValueError, match="at least one"):
        merge_reports([])


def test_table_contains_the_numbers(setup):
    _, _, _, report = setup
    table = report.table()
    assert table.splitlines()[0] == (
        f"| quantity | nats | ± MC s.e. | ± s.e. over the {N} datapoints | how |"
    )
    for quantity in [
        report.log_px,
        report.elbo_amortized,
        report.amortization_gap,
        report.inference_gap,
        report.approximation_gap["diagonal"],
        report.approximation_gap["fullcov"],
        report.elbo_local["fullcov"],
    ]:
        assert f"| {quantity.mean:.3f} | {quantity.mc_se:.3f} | {quantity.data_se:.3f} |" in table
    assert "approximation gap (fullcov)" in table
    assert "amortization gap" in table


def test_timings_and_fit_statistics(setup):
    _, _, _, report = setup
    seconds = report.seconds_per_datapoint
    assert set(seconds) == {"encoder", "local/diagonal", "local/fullcov", "iwae"}
    assert all(s > 0 for s in seconds.values())
    assert seconds["local/diagonal"] > seconds["encoder"]  # one forward pass vs an optimisation
    for stats in report.local_fit.values():
        assert 0 < stats["mean_steps"] <= 2000
        assert 0 <= stats["converged_fraction"] <= 1


def test_training_modes_are_restored(setup):
    lg, _, encoder, report = setup
    assert isinstance(report, GapReport)
    assert lg.model.training
    assert encoder.training


def test_local_init_sets_where_q_star_starts(setup):
    lg, x, encoder, _ = setup
    x = x[:10]
    family = DiagonalGaussian(3)
    kl = inference_gap_closed_form(lg, x)  # log p(x) - L[q] of the encoder's q
    # one tiny step from the encoder's q: L[q*] is still L[q], so no amortization gap yet
    reports = {}
    for init in ("encoder", "prior"):
        torch.manual_seed(1)
        reports[init] = gap_report(
            lg.model,
            x,
            encoder,
            family,
            families=[FullCovarianceGaussian(3)],
            iwae_k=100,
            elbo_samples=20_000,
            local_init=init,
            local_kwargs={"steps": 1, "check_every": 1, "lr": 1e-6, "batch_size": 3},
        )
    gap = reports["encoder"].amortization_gap
    assert abs(gap.mean) < 4 * gap.mc_se
    assert gap.mc_se < 0.03
    # one tiny step from the prior N(0, I): L[q*] is L[N(0, I)], far from L[q]
    prior_lam = family.prior_init(10, dtype=DTYPE)
    torch.manual_seed(2)
    with torch.no_grad():
        l_prior, l_prior_se = elbo(lg.model, family, prior_lam, x, 20_000, stderr=True)
    l_prior, l_prior_se = float(l_prior.mean()), float(l_prior_se.square().sum().sqrt() / 10)
    l_q = float((lg.log_px(x) - kl).mean())
    gap = reports["prior"].amortization_gap
    assert abs(gap.mean - (l_prior - l_q)) < 4 * math.hypot(gap.mc_se, l_prior_se)
    assert l_prior - l_q < -1.0  # the prior is a far worse q than the encoder's
    assert reports["prior"].settings["local_init"] == "prior"
    assert "batch_size" not in reports["prior"].settings["local_kwargs"]
    assert reports["encoder"].local_fit["diagonal"]["mean_steps"] == 1
    # another family starts moment-matched to the encoder family's q*, or at the prior
    for init, target in (("encoder", reports["encoder"].elbo_local["diagonal"].mean),
                         ("prior", l_prior)):  # fmt: skip
        full = reports[init].elbo_local["fullcov"]
        assert abs(full.mean - target) < 4 * math.hypot(full.mc_se, l_prior_se)


def test_bad_arguments_raise(setup):
    lg, x, encoder, _ = setup
    family = DiagonalGaussian(3)
    with pytest.raises(ValueError, match="local_init"):
        gap_report(lg.model, x, encoder, family, local_init="zeros")
    with pytest.raises(ValueError, match="elbo_samples"):
        gap_report(lg.model, x, encoder, family, elbo_samples=1)
    with pytest.raises(ValueError, match="iwae_k"):
        gap_report(lg.model, x, encoder, family, iwae_k=0)


def test_ais_estimate_is_shown_beside_iwae_and_both_match_exact(setup):
    lg, x, encoder, _ = setup
    torch.manual_seed(3)
    report = gap_report(
        lg.model, x, encoder, DiagonalGaussian(3), iwae_k=500, elbo_samples=200,
        ais_steps=100, ais_chains=8,
    )  # fmt: skip
    exact = float(lg.log_px(x).mean())
    assert set(report.log_px_estimates) == {"iwae", "ais"}
    for estimate in report.log_px_estimates.values():
        assert estimate.mean == pytest.approx(exact, abs=0.05)
    best = max(report.log_px_estimates, key=lambda k: report.log_px_estimates[k].mean)
    assert report.log_px.mean == report.log_px_estimates[best].mean
    assert report.log_px_method.lower().startswith(best)
    assert report.seconds_per_datapoint["ais"] > 0
    assert "log p(x) by ais" in report.table()


def test_refinement_curve_runs_from_the_encoder_to_q_star(setup):
    lg, x, encoder, _ = setup
    torch.manual_seed(5)
    report = gap_report(lg.model, x, encoder, DiagonalGaussian(3), iwae_k=100,
                        elbo_samples=4000, refine_steps=(0, 2, 300),
                        refine_kwargs={"samples": 8}, batch_size=16)  # fmt: skip
    assert list(report.refinement) == ["0", "2", "300"]
    start, end = report.refinement["0"], report.refinement["300"]
    l_q, l_star = report.elbo_amortized, report.elbo_local["diagonal"]
    assert abs(start.mean - l_q.mean) < 4 * math.hypot(start.mc_se, l_q.mc_se)
    assert report.refinement["2"].mean > start.mean
    assert abs(end.mean - l_star.mean) < 0.05
    assert report.seconds_per_datapoint["refine/300"] > report.seconds_per_datapoint["refine/2"]
    assert "L[q] after 300 refinement steps" in report.table()
    assert GapReport.from_dict(report.to_dict()).refinement == report.refinement
    assert merge_reports([report]).refinement == report.refinement


def test_a_seeded_report_draws_per_block_and_leaves_the_caller_s_random_state(setup):
    lg, x, encoder, _ = setup
    kwargs = {"iwae_k": 20, "elbo_samples": 10, "batch_size": 8, "seed": 3,
              "local_kwargs": {"steps": 20, "check_every": 10}}  # fmt: skip
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = gap_report(lg.model, x[:20], encoder, DiagonalGaussian(3), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    torch.manual_seed(999)  # another global state: the same report
    b = gap_report(lg.model, x[:20], encoder, DiagonalGaussian(3), **kwargs)
    flat_a, flat_b = _arrays(a.per_datapoint.to_dict()), _arrays(b.per_datapoint.to_dict())
    assert flat_a.keys() == flat_b.keys()
    for key, values in flat_a.items():
        assert np.array_equal(values, flat_b[key], equal_nan=True), key
    # each block has its own stream: the first block's draws do not depend on the rest
    c = gap_report(lg.model, x[:8], encoder, DiagonalGaussian(3), **kwargs)
    assert np.array_equal(c.per_datapoint.log_px.value, a.per_datapoint.log_px.value[:8])
    d = gap_report(lg.model, x[:20], encoder, DiagonalGaussian(3), **{**kwargs, "seed": 4})
    assert not np.array_equal(d.per_datapoint.log_px.value, a.per_datapoint.log_px.value)
    with pytest.raises(ValueError, match="needs a seed"):
        from amortized.distributed import World

        gap_report(lg.model, x, encoder, DiagonalGaussian(3), world=World(0, 2))


def _arrays(nested, prefix=""):
    """Every list of a nested dict, by its path."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out |= _arrays(value, f"{prefix}{key}/")
        elif isinstance(value, list):
            out[prefix + key] = np.asarray(value)
    return out


class _PriorEncoder(torch.nn.Module):
    def __init__(self, family):
        super().__init__()
        self.family = family

    def forward(self, x):
        return self.family.prior_init(x.shape[0], dtype=x.dtype)


def test_the_report_certifies_q_star_and_warns_when_more_steps_would_move_a_gap():
    from battery import battery

    lg, x = battery(10)["peaked"]
    family = DiagonalGaussian(lg.latent_dim)
    settings = dict(iwae_k=100, elbo_samples=100, seed=0, local_init="prior")
    with pytest.warns(UserWarning, match=r"q\* \(diagonal\).*raise local_steps"):
        short = gap_report(lg.model, x, _PriorEncoder(family), family,
                           local_kwargs={"steps": 100}, **settings)  # fmt: skip
    assert short.local_fit["diagonal"]["converged_fraction"] == 0
    assert short.local_fit["diagonal"]["mean_remaining"] > 1
    assert short.convergence_warnings()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"q\*")  # a converged q* raises no warning
        full = gap_report(lg.model, x, _PriorEncoder(family), family, **settings)
    assert full.local_fit["diagonal"]["converged_fraction"] == 1
    assert "10 of 10 rows converged" in full.convergence()
    assert full.local_fit["diagonal"]["mean_remaining"] < full.amortization_gap.mc_se
