"""A study resumes by its finished stages and never leaves outputs of two settings side
by side."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import amortized.apps.study as study_module
from amortized.apps.study import run_study
from amortized.config import GapConfig, StudyConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")



def _config(data, **gap) -> StudyConfig:
    train = TrainConfig(dataset=str(data), latent_dim=2, hidden=(16,), epochs=2, batch_size=50,
                        progress=False, diagnostics_points=20)  # fmt: skip
    gap = GapConfig(iwae_k=20, elbo_samples=10, local_steps=20, eval_batch_size=40,
                    refine_steps=(0, 2), **gap)  # fmt: skip
    return StudyConfig(train=train, gap=gap, train_subset=30)


def _reports(run_dir):
    return {s: json.loads((run_dir / f"gaps_{s}.json").read_text()) for s in ("train", "test")}


def _without_timings(report):
    return {k: v for k, v in report.items() if k != "seconds_per_datapoint"}


def test_a_study_killed_after_one_report_resumes_without_measuring_it(tiny_npz, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    config = _config(tiny_npz)
    run_study(config, tmp_path / "whole")
    measured = []
    real = study_module.measure_gaps

    def dying(trained, x, gap, progress, world=None):
        if measured:  # the second report: killed
            raise KeyboardInterrupt
        measured.append(len(x))
        return real(trained, x, gap, progress, world)

    monkeypatch.setattr(study_module, "measure_gaps", dying)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, tmp_path / "killed")
    assert (tmp_path / "killed" / "gaps_train.json").is_file()
    assert not (tmp_path / "killed" / "report.md").exists()
    counted = []

    def counting(trained, x, gap, progress, world=None):
        counted.append(len(x))
        return real(trained, x, gap, progress, world)

    monkeypatch.setattr(study_module, "measure_gaps", counting)
    run_study(config, tmp_path / "killed")
    assert counted == [40]  # only the test split's report was measured again
    whole, resumed = _reports(tmp_path / "whole"), _reports(tmp_path / "killed")
    for split in ("train", "test"):
        assert _without_timings(resumed[split]) == _without_timings(whole[split])


def test_other_settings_first_set_the_earlier_outputs_aside(tiny_npz, tmp_path):
    run = tmp_path / "run"
    run_study(_config(tiny_npz), run)
    before = (run / "report.md").read_text()
    with pytest.warns(UserWarning, match="held outputs of other settings; they were moved"):
        run_study(_config(tiny_npz, local_lr=0.01), run)
    aside = run / "replaced" / "1"
    assert (aside / "report.md").read_text() == before
    assert {"gaps_train.json", "gaps_test.json", "results.json", "WHY.txt"} <= {
        p.name for p in aside.iterdir()}  # fmt: skip
    settings = json.loads((run / "gaps_test.json").read_text())["settings"]
    assert settings["local_kwargs"]["lr"] == 0.01
    stages = json.loads((run / "stages.json").read_text())
    assert stages["done"] == ["gaps_train.json", "gaps_test.json"]
    # the same settings again: nothing set aside, nothing measured again
    run_study(_config(tiny_npz, local_lr=0.01), run)
    assert not (run / "replaced" / "2").exists()


def test_a_study_whose_device_is_missing_writes_nothing(tiny_npz, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = _config(tiny_npz)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run_study(replace(config, train=replace(config.train, device="cuda")), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_model_still_improving_when_its_epochs_ran_out_is_flagged(tiny_npz, tmp_path):
    from amortized.train import read_metrics

    run_study(_config(tiny_npz), tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()
    rising = metrics[-1]["valid_elbo"] > metrics[-2]["valid_elbo"]
    assert (results["training"]["still_rising"] is not None) == rising
    assert ("may be undertrained" in report) == rising
    assert study_module._still_rising(metrics, epochs=5) is None  # it stopped early
    falling = [{"valid_elbo": -90.0, "best_valid_elbo": -90.0},
               {"valid_elbo": -91.0, "best_valid_elbo": -90.0}]
    assert study_module._still_rising(falling, epochs=2) is None
    rising_two = [{"valid_elbo": -91.0, "best_valid_elbo": -91.0},
                  {"valid_elbo": -90.0, "best_valid_elbo": -90.0}]
    assert study_module._still_rising(rising_two, epochs=2) == pytest.approx(1.0)
