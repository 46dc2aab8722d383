"""The command line: help, one-line errors, and a study end to end on tiny settings."""

from __future__ import annotations

import json
import math
import platform

import numpy as np
import pytest

import amortized
from amortized.apps.cli import main

TINY = [
    "--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--no-progress",
    "--iwae-k", "20", "--elbo-samples", "10", "--local-steps", "20", "--eval-batch-size", "40",
]  # fmt: skip



@pytest.mark.parametrize("command", [[], ["study"], ["train"], ["gap"], ["collapse"], ["download"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: amortized" in capsys.readouterr().out


def test_study_end_to_end_then_gap(tiny_npz, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["study", "--dataset", str(tiny_npz), "--run-dir", str(run), "--train-subset", "30"]
    assert main([*argv, *TINY, "--families", "fullcov"]) == 0
    for name in ("report.md", "results.json", "gaps.png", "training.png", "images.png",
                 "refinement.png", "gaps_train.json", "gaps_test.json", "config.toml",
                 "metrics.jsonl", "latent_use.png"):  # fmt: skip
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    test = results["gaps"]["test"]
    assert test["n"] == 40 and results["gaps"]["train"]["n"] == 30
    total = test["approximation_gap"]["diagonal"]["mean"] + test["amortization_gap"]["mean"]
    assert total == pytest.approx(test["inference_gap"]["mean"], abs=1e-4)
    assert "fullcov" in test["elbo_local"]
    report = (run / "report.md").read_text()
    assert "| amortization gap |" in report and "training subset" in report
    # both kinds of error, and test minus train with the errors of an unpaired difference
    gap_test, gap_train = test["amortization_gap"], results["gaps"]["train"]["amortization_gap"]
    assert gap_test["data_se"] > 0 and gap_test["mc_se"] > 0
    d = gap_test["mean"] - gap_train["mean"]
    mc, data = (math.hypot(gap_test[k], gap_train[k]) for k in ("mc_se", "data_se"))
    assert f"| {d:+.3f} ± {mc:.3f} [± {data:.3f}] |" in report
    assert "test - train" in report and "s.e. over the datapoints" in report
    # the study's refinement curve, K = 0 being the encoder itself
    assert list(test["refinement"]) == ["0", "1", "2", "5", "10", "20", "50", "100"]
    assert test["refinement"]["0"]["mean"] == pytest.approx(test["elbo_amortized"]["mean"], abs=1.0)
    assert "Buying the bound back" in report
    latent = results["training"]["latent"]
    assert latent["points"] == 50 and len(latent["kl_per_dim"]) == 2  # the tiny data's valid split
    assert f"{latent['active_units']} of 2 units active" in report
    # what reproduces it: versions, seeds and the settings that ran
    machine = results["machine"]
    assert machine["python"] == platform.python_version() and machine["numpy"] == np.__version__
    assert f"amortized {amortized.__version__}" in report and "training seed 0" in report
    assert f"Python {machine['python']}" in report and "Command: `" in report
    capsys.readouterr()

    assert main(["gap", str(run), "--split", "valid", "--iwae-k", "10", "--elbo-samples", "5",
                 "--local-steps", "10", "--no-progress"]) == 0  # fmt: skip
    assert "amortization gap" in capsys.readouterr().out
    assert json.loads((run / "gaps_valid.json").read_text())["n"] == 50

    # refinement by SA-VAE's momentum SGD instead of Adam
    assert main(["gap", str(run), "--iwae-k", "10", "--elbo-samples", "5", "--local-steps", "10",
                 "--refine-steps", "0,3", "--refine-method", "sgd", "--refine-lr", "0.01",
                 "--output", str(run / "sgd.json"), "--no-progress"]) == 0  # fmt: skip
    sgd = json.loads((run / "sgd.json").read_text())
    assert list(sgd["refinement"]) == ["0", "3"]
    assert sgd["settings"]["refine_kwargs"]["method"] == "sgd"

    # an output that cannot be written is refused before the report is computed
    capsys.readouterr()
    assert main(["gap", str(run), "--output", str(tmp_path / "no-such-dir" / "x.json"),
                 "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.endswith("no-such-dir does not exist") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epochs", "many"], "--epochs: expected int, got 'many'"),
        (["train", "--lr", "fast"], "--lr: expected float"),
        (["train", "--family", "banana"], "family must be one of"),
        (["train", "--dataset", "nosuch.npz"], "nosuch.npz"),
        (["train", "--dataset", "two\nlines.npz"], "lines.npz"),
        (["train", "--config", "missing.toml"], "config file not found"),
        (["gap", "no-such-run"], "no trained model in no-such-run"),
        (["study", "--refine-method", "newton"], "--refine-method must be one of ('adam', 'sgd')"),
        (["train", "--device", "tpu"], "device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["gap", "no-such-run", "--output", "/no-such-dir/x.json"], "no trained model in"),
        (["gap", "no-such-run", "--local-lr", "-1"], "local_lr must be a positive number"),
        (["gap", "no-such-run", "--local-lr", "nan"], "local_lr must be a positive number"),
        (["gap", "no-such-run", "--iwae-k", "1"], "iwae_k must be >= 2"),
        (["gap", "no-such-run", "--eval-batch-size", "0"], "eval_batch_size must be >= 1"),
    ],
)
def test_bad_values_give_one_line_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--no-progress"] if argv[0] != "gap" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


def test_download_offline_says_where_to_put_the_files(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["download", "binarized-mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "offline" in err and str(tmp_path) in err and "binarized_mnist_train.amat" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_study_of_an_untrained_model(tiny_npz, tmp_path):
    run = tmp_path / "run0"
    argv = ["study", "--dataset", str(tiny_npz), "--run-dir", str(run), "--train-subset", "10"]
    assert main([*argv, "--latent-dim", "2", "--hidden", "16", "--epochs", "0", "--no-progress",
                 "--iwae-k", "5", "--elbo-samples", "4", "--local-steps", "5",
                 "--max-points", "10"]) == 0  # fmt: skip
    assert "0 epochs." in (run / "report.md").read_text()


def test_training_plot_survives_epochs_without_finite_values(tmp_path):
    from amortized.apps.plots import plot_training_curves

    metrics = [{"epoch": e, "train_loss": 100.0 - e, "valid_elbo": -101.0 + e} for e in range(5)]
    metrics += [{"epoch": 5, "train_loss": float("nan"), "valid_elbo": float("nan")}]
    assert plot_training_curves(metrics, tmp_path / "t.png").stat().st_size > 0


def test_study_with_the_autoregressive_decoder_shows_draws(tiny_npz, tmp_path):
    run = tmp_path / "run"
    argv = ["study", "--dataset", str(tiny_npz), "--run-dir", str(run), "--train-subset", "20",
            "--decoder", "pixelcnn", "--pixelcnn-channels", "4", "--pixelcnn-layers", "1",
            "--pixelcnn-kernel", "3", "--refine-steps", "0,2", "--max-points", "20"]  # fmt: skip
    assert main([*argv, *TINY]) == 0
    assert (run / "images.png").is_file()
    assert "## Is the latent code used?" in (run / "report.md").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["train"]["decoder"] == "pixelcnn"


def test_warnings_are_shown_as_one_line_each_and_the_usual_display_comes_back(capsys):
    import warnings

    from amortized.apps.cli import _plain_warnings

    usual = warnings.showwarning
    with _plain_warnings(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("epoch 1: latent code collapsing: KL 0.001 nats per datapoint", stacklevel=1)
    assert capsys.readouterr().err == (
        "amortized: warning: epoch 1: latent code collapsing: KL 0.001 nats per datapoint\n"
    )
    assert warnings.showwarning is usual


def test_diverged_training_exits_non_zero_with_one_line(tiny_npz, tmp_path, capsys):
    code = main(["train", "--dataset", str(tiny_npz), "--run-dir", str(tmp_path / "run"),
                 "--lr", "1e308", "--latent-dim", "2", "--hidden", "16", "--epochs", "2",
                 "--no-progress"])  # fmt: skip
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("amortized: ") or "error:" in line]  # fmt: skip
    assert len(err) == 1 and "training diverged in epoch 1" in err[0], err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_an_os_error_is_one_line_naming_the_path(tiny_npz, tmp_path, capsys):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    code = main(["train", "--dataset", str(tiny_npz), "--run-dir", str(not_a_dir),
                 "--epochs", "1", "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"amortized train: error: {not_a_dir}: File exists"


def test_the_command_line_says_what_it_is_doing(tiny_npz, tmp_path, capsys):
    """Progress lines, also without progress bars: how grey levels are read, resuming or
    finding a run finished, and the study's phases."""
    run = tmp_path / "run"
    argv = ["train", "--dataset", str(tiny_npz), "--run-dir", str(run), "--latent-dim", "2",
            "--hidden", "16", "--epochs", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "amortized: tiny.npz holds grey levels in [0, 1]: the Bernoulli model sees them " \
           "binarized" in err  # fmt: skip
    assert main(argv) == 0
    assert f"amortized: {run}: finished after epoch 1 of 1" in capsys.readouterr().err
    assert main(["study", "--dataset", str(tiny_npz), "--run-dir", str(tmp_path / "s"),
                 "--train-subset", "20", *TINY]) == 0  # fmt: skip
    err = capsys.readouterr().err
    for phase in ("training on tiny.npz (200 images)", "measuring the gaps on 20 train images",
                  "measuring the gaps on 40 test images"):  # fmt: skip
        assert f"amortized: {phase}" in err, phase


def test_each_command_s_help_shows_its_own_defaults(capsys):
    from amortized.config import CollapseConfig, StudyConfig

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    gap = StudyConfig().gap
    assert f"IWAE samples for log p(x) (default: {gap.iwae_k})" in text
    assert f"max steps of per-datapoint VI (default: {gap.local_steps})" in text
    assert "(default: 0,1,2,5,10,20,50,100)" in text
    with pytest.raises(SystemExit):
        main(["collapse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    squeezed = "".join(text.split())  # help wraps lines at hyphens too
    assert f"(default:{CollapseConfig().train.dataset!r})" in squeezed
    assert "--warmup-epochs" not in text and "--inference" not in text  # the remedies' own
