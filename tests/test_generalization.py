"""The generalization study on tiny data: its tables agree with the gap reports they come
from, the capacity rows with gap reports of the same encoders, and a rerun measures
nothing again."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from amortized.apps.cli import main
from amortized.apps.generalization import run_generalization
from amortized.config import ConfigError, GapConfig, GeneralizationConfig, TrainConfig
from amortized.measure.report import GapReport, difference

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def inverted_npz(tiny_npz, tmp_path_factory):
    """The tiny images with black and white swapped: a dataset no model trained on the
    originals has seen."""
    data = np.load(tiny_npz)
    path = tmp_path_factory.mktemp("data") / "inverted.npz"
    np.savez(path, **{split: 1.0 - data[split] for split in ("train", "valid", "test")})
    return path


def _config(tiny_npz, inverted_npz, **gap) -> GeneralizationConfig:
    train = TrainConfig(dataset=str(tiny_npz), latent_dim=4, hidden=(16,), epochs=4,
                        batch_size=50, gap_every=2, gap_points=10, diagnostics_points=0,
                        progress=False)  # fmt: skip
    gap = GapConfig(iwae_k=50, local_steps=40, elbo_samples=20, max_points=15,
                    refine_steps=(0, 2, 5), **gap)  # fmt: skip
    return GeneralizationConfig(train=train, gap=gap, shift_dataset=str(inverted_npz),
                                capacity_hidden=(32, 32), capacity_epochs=3)  # fmt: skip


@pytest.fixture(scope="module")
def study(tiny_npz, inverted_npz, tmp_path_factory, single_thread):
    run_dir = tmp_path_factory.mktemp("generalization")
    results = run_generalization(_config(tiny_npz, inverted_npz), run_dir)
    return run_dir, results


def test_the_shift_table_is_the_gap_reports_it_comes_from(study):
    run_dir, results = study
    a_on_a = GapReport.from_json(run_dir / "gaps_tiny_on_tiny.json")
    a_on_b = GapReport.from_json(run_dir / "gaps_tiny_on_inverted.json")
    pairs = results["shift"]["pairs"]
    assert set(pairs) == {"tiny on tiny", "tiny on inverted (shifted)",
                          "inverted on inverted", "inverted on tiny (shifted)"}  # fmt: skip
    assert pairs["tiny on inverted (shifted)"]["amortization_gap"]["mean"] == \
        a_on_b.amortization_gap.mean  # fmt: skip
    growth = results["shift"]["growth_out_of_distribution"]["tiny"]["amortization_gap"]
    expected = difference(a_on_b, a_on_a, "amortization_gap", paired=False)
    assert growth["mean"] == pytest.approx(expected.mean)
    assert growth["mc_se"] == pytest.approx(math.hypot(a_on_a.amortization_gap.mc_se,
                                                       a_on_b.amortization_gap.mc_se))  # fmt: skip
    # refinement: gains paired over the encoder on the same images, with their costs
    steps = results["refinement"]["tiny on inverted (shifted)"]
    assert [s["steps"] for s in steps] == [2, 5]
    gain = a_on_b.contrast("elbo_refined/5", "elbo_amortized")
    assert steps[1]["gain"] == pytest.approx(gain.mean)
    assert steps[1]["ms_per_datapoint"] == pytest.approx(
        1000 * a_on_b.seconds_per_datapoint["refine/5"])
    assert steps[1]["share_of_amortization_gap"] == pytest.approx(
        gain.mean / a_on_b.amortization_gap.mean)


def test_the_capacity_rows_score_encoders_of_the_sizes_asked_for(study):
    run_dir, results = study
    encoders = results["capacity"]["encoders"]
    assert [row["hidden"] for row in encoders.values()] == [[16], [16], [32, 32]]
    # 784 -> 16 -> 2 x 4 and 784 -> 32 -> 32 -> 2 x 4, weights and biases
    assert encoders["standard, trained on the fixed decoder"]["parameters"] == \
        784 * 16 + 16 + 16 * 8 + 8  # fmt: skip
    assert encoders["large, trained on the fixed decoder"]["parameters"] == \
        784 * 32 + 32 + 32 * 32 + 32 + 32 * 8 + 8  # fmt: skip
    a_on_a = GapReport.from_json(run_dir / "gaps_tiny_on_tiny.json")
    on_train = GapReport.from_json(run_dir / "gaps_tiny_on_tiny-train.json")
    joint = encoders["trained with its decoder"]
    assert joint["test"]["amortization_gap"]["mean"] == pytest.approx(
        a_on_a.amortization_gap.mean)
    assert joint["train"]["amortization_gap"]["mean"] == pytest.approx(
        on_train.amortization_gap.mean)
    assert results["capacity"]["images"] == {"train": 15, "test": 15}
    for name in ("standard", "large"):  # each encoder trained its epochs, on the decoder alone
        log = [json.loads(line) for line in
               (run_dir / f"encoder-{name}" / "metrics.jsonl").read_text().splitlines()]
        assert len(log) == 3
    row = encoders["large, trained on the fixed decoder"]
    for split, report in (("test", a_on_a), ("train", on_train)):
        local = report.elbo_local["diagonal"].mean
        assert row[split]["amortization_gap"]["mean"] == pytest.approx(
            local - row[split]["elbo_amortized"]["mean"])


def test_a_capacity_row_is_its_saved_encoder_on_the_saved_decoder(study, tiny_npz):
    """The encoders learnt on the decoder without moving it: the saved encoder, scored on
    the decoder as training saved it, gives the row's L[q] again."""
    from amortized import elbo
    from amortized.nets.encoders import MLPEncoder
    from amortized.train import evaluation_subset, load_run, prepare_split
    from amortized.train.checkpoint import load_checkpoint

    run_dir, results = study
    trained = load_run(run_dir / "train-tiny")
    encoder = MLPEncoder(784, trained.family, hidden=(32, 32))
    encoder.load_state_dict(load_checkpoint(run_dir / "encoder-large" / "checkpoint.pt")["module"])
    from amortized.data import load_dataset

    x = evaluation_subset(prepare_split(load_dataset(str(tiny_npz)), "test", "bernoulli"), 15)
    torch.manual_seed(GapConfig().eval_seed)
    with torch.no_grad():
        value = elbo(trained.model, trained.family, encoder(x), x, samples=20).mean().item()
    row = results["capacity"]["encoders"]["large, trained on the fixed decoder"]
    # the same draws and weights; the report sums its rows in another order (float32)
    assert value == pytest.approx(row["test"]["elbo_amortized"]["mean"], rel=1e-6)


def test_the_report_and_figures_are_written_and_a_rerun_measures_nothing(study, tiny_npz,
                                                                       inverted_npz, monkeypatch):
    run_dir, results = study
    report = (run_dir / "report.md").read_text()
    for heading in ("## Gaps over training", "## Distribution shift", "## What refinement",
                    "## Encoder capacity", "## Machine and provenance"):  # fmt: skip
        assert heading in report
    for png in results["figures"].values():
        assert (run_dir / png).stat().st_size > 1000
    assert set(results["figures"]) == {"gaps_over_training/tiny", "gaps_over_training/inverted",
                                       "refinement"}  # fmt: skip

    from amortized.apps import generalization

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(generalization, "measure_gaps", refuse)
    monkeypatch.setattr(generalization, "fit", refuse)
    again = run_generalization(_config(tiny_npz, inverted_npz), run_dir)
    assert again["shift"] == results["shift"] and again["capacity"] == results["capacity"]


def test_mistakes_are_one_line_before_anything_runs(tiny_npz, tmp_path, capsys):
    config = _config(tiny_npz, tiny_npz)
    with pytest.raises(ConfigError, match="the training dataset itself"):
        run_generalization(config, tmp_path / "same")
    assert not (tmp_path / "same").exists()
    other = tmp_path / "small.npz"
    np.savez(other, train=np.zeros((20, 9)), test=np.zeros((5, 9)))
    code = main(["generalization", "--dataset", str(tiny_npz), "--shift-dataset", str(other),
                 "--epochs", "1", "--run-dir", str(tmp_path / "sizes")])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "differ in size" in err[0], err
