"""The collapse study end to end on a small synthetic image set: every row trained, scored
and reported; rerun, finished runs are only rescored; bad settings refused."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import torch

from amortized.apps.cli import main
from amortized.apps.collapse import REMEDIES, run_collapse_study, train_config
from amortized.config import CollapseConfig, ConfigError, TrainConfig, load_config
from amortized.data import Dataset
from amortized.train import evaluation_subset, load_run, prepare_split, read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(
    made_hidden=(16,), latent_dim=2, epochs=2, savae_epochs=1, valid_points=0, test_points=20,
    iwae_k=4, vq_latents=2, vq_code_dim=2, vq_codebook=4, prior_epochs=1,
)  # fmt: skip


def small(**change) -> CollapseConfig:
    """SMALL with ``change``: the shared training settings go into ``train``."""
    settings = {**SMALL, **change}
    shared = {f.name for f in fields(TrainConfig)}
    train = replace(CollapseConfig().train, **{k: v for k, v in settings.items() if k in shared})
    return CollapseConfig(train=train, **{k: v for k, v in settings.items() if k not in shared})


@pytest.fixture(scope="module")
def strokes():
    """6 x 6 binary images: a bar whose row depends on a hidden class, plus pixel noise."""
    g = torch.Generator().manual_seed(0)

    def draw(n):
        rows = torch.randint(0, 6, (n,), generator=g)
        images = torch.zeros(n, 6, 6)
        images[torch.arange(n), rows] = 1.0
        flips = torch.rand(n, 6, 6, generator=g) < 0.05
        return (images + flips).remainder(2).reshape(n, 36)

    return Dataset("strokes", draw(200), draw(40), draw(40), "static", (6, 6))


@pytest.fixture(scope="module")
def study(strokes, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("collapse")
    return run_dir, run_collapse_study(small(), run_dir, dataset=strokes)


def test_every_row_is_trained_scored_and_reported(study):
    run_dir, results = study
    rows = results["rows"]
    assert list(rows) == [*REMEDIES, "vq-vae"]
    for name in REMEDIES:
        r = rows[name]
        assert r["epochs"] == (1 if name == "savae" else 2)
        assert r["kl"] >= 0 and 0 <= r["active_units"] <= 2
        assert r["kl"] == pytest.approx(sum(r["kl_per_dim"]), rel=1e-5)
        assert r["collapsed"] == (r["active_units"] == 0 or r["kl"] < 1.0)
        assert (run_dir / f"{name}_latent_use.png").stat().st_size > 0
    vq = rows["vq-vae"]
    assert 1.0 <= vq["perplexity"] <= 4.0 and 1 <= vq["codes_used"] <= 4
    # the learned prior is fitted to the codes: on average it beats the uniform one's
    # log 4 nats per code only loosely after one epoch, so just check both are bounds
    assert vq["nll_uniform_prior"] > 0 and vq["nll_learned_prior"] > 0
    assert (run_dir / "vqvae_images.png").stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    for label in ("MADE VAE, plain", "MADE VAE, free-bits", "MADE alone (z cut off)", "VQ-VAE"):
        assert label in report
    assert json.loads((run_dir / "results.json").read_text())["rows"].keys() == rows.keys()


def test_the_decoder_alone_scores_its_own_likelihood(study, strokes):
    run_dir, results = study
    alone = results["rows"]["decoder-alone"]
    trained = load_run(run_dir / "decoder-alone")
    x = evaluation_subset(prepare_split(strokes, "test", "bernoulli"), 20)
    with torch.no_grad():  # p(x | z) = p(x): any z gives the exact log-likelihood
        log_px = float(trained.model.decoder(torch.randn(20, 2)).log_prob(x).mean())
    # ELBO = log p(x) - KL in expectation; IWAE-k lies between the ELBO and log p(x)
    assert alone["elbo"] == pytest.approx(log_px - alone["kl"], abs=0.05 + 0.2 * alone["kl"])
    assert alone["elbo"] - 0.05 <= -alone["nll_iwae"] <= log_px + 0.05


def test_rerunning_rescores_without_retraining(study, strokes):
    run_dir, results = study
    before = {name: read_metrics(run_dir / name) for name in REMEDIES}
    again = run_collapse_study(small(), run_dir, dataset=strokes)
    assert {name: read_metrics(run_dir / name) for name in REMEDIES} == before
    for name in REMEDIES:
        assert again["rows"][name]["nll_iwae"] == results["rows"][name]["nll_iwae"]


def test_each_row_shares_the_model_and_differs_in_training_only():
    config = small(lr=5e-3, lr_schedule="cosine")
    plain = train_config(config, "plain")
    assert train_config(config, "free-bits").free_bits == 0.25
    assert train_config(config, "savae").epochs == 1 and plain.epochs == 2
    assert not train_config(config, "decoder-alone").decoder_uses_z and plain.decoder_uses_z
    for name in REMEDIES:
        other = train_config(config, name)
        assert (other.decoder, other.made_hidden, other.latent_dim) == ("made", (16,), 2)
        assert (other.lr, other.lr_schedule) == (5e-3, "cosine")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"remedies": ("plain", "dropout")}, "unknown"),
        ({"decoder": "mlp"}, "decoder must be"),
        ({"remedies": (), "vqvae": False}, "nothing to run"),
        ({"iwae_k": 0}, "iwae_k"),
        ({"test_points": -1}, "test_points"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_settings_are_refused_before_any_work(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_collapse_study(small(**change), tmp_path / "run")
    assert not (tmp_path / "run" / "plain").exists()


def test_the_command_line_reports_a_bad_remedy_in_one_line(tmp_path, capsys):
    code = main(["collapse", "--run-dir", str(tmp_path), "--remedies", "plain,nope"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "unknown ['nope']" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "option", ["--epochs=two", "--made-hidden=5,x", "--seed=s", "--iwae-k=1.5"]
)
def test_the_command_line_refuses_values_of_the_wrong_type_in_one_line(option, tmp_path, capsys):
    code = main(["collapse", "--run-dir", str(tmp_path), option])
    err = capsys.readouterr().err.strip()
    assert code == 2 and option.split("=")[0] in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_study_runs_with_the_pixelcnn_decoder(strokes, tmp_path):
    config = small(decoder="pixelcnn", pixelcnn_channels=4, pixelcnn_layers=2,
                   pixelcnn_kernel=3, remedies=("plain", "decoder-alone"), vqvae=False)  # fmt: skip
    rows = run_collapse_study(config, tmp_path, dataset=strokes)["rows"]
    assert list(rows) == ["plain", "decoder-alone"]
    assert rows["decoder-alone"]["active_units"] == 0 or rows["decoder-alone"]["kl"] < 1.0
    report = (tmp_path / "report.md").read_text()
    assert "PixelCNN VAE, plain" in report and "PixelCNN alone (z cut off)" in report


def test_a_remedy_s_own_setting_is_refused_and_not_offered(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^train.inference is set by each remedy"):
        run_collapse_study(small(inference="svi"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["collapse", "--run-dir", str(tmp_path / "cli"), "--warmup-epochs", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --warmup-epochs" in capsys.readouterr().err


def test_a_collapse_config_file_holds_a_training_table_and_older_flat_files_still_read(tmp_path):
    nested = tmp_path / "nested.toml"
    nested.write_text('iwae_k = 7\n[train]\nlatent_dim = 3\n')
    config = load_config(CollapseConfig, nested)
    # what the file leaves out keeps the collapse study's defaults, not TrainConfig's
    assert config.train.latent_dim == 3 and config.iwae_k == 7
    assert (config.train.dataset, config.train.decoder, config.train.epochs) == (
        "binarized-mnist", "made", 40)  # fmt: skip
    flat = tmp_path / "flat.toml"  # the layout before CollapseConfig held a TrainConfig
    flat.write_text('iwae_k = 7\nlatent_dim = 3\ndecoder = "made"\n')
    assert load_config(CollapseConfig, flat) == config
    # and a run's config.toml reads back as the config that wrote it
    from amortized.config import save_config

    save_config(config, tmp_path / "saved.toml")
    assert load_config(CollapseConfig, tmp_path / "saved.toml") == config
