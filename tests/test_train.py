"""Training: determinism, resume after a kill, checkpoints, config checks."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from amortized import InverseAutoregressiveFlow, gap_report
from amortized.config import ConfigError, TrainConfig, load_config, save_config, to_dict
from amortized.data import Dataset, load_dataset
from amortized.inference.iterative import IterativeEncoder
from amortized.train import build, load_run, prepare_split, read_metrics, train, training_bounds
from amortized.train.checkpoint import CheckpointError, load_checkpoint, save_atomic

TINY = dict(latent_dim=2, hidden=(16,), epochs=4, batch_size=50, progress=False, patience=50)


@pytest.fixture(scope="module")
def tiny_data() -> Dataset:
    full = load_dataset("mnist5k")
    return Dataset("tiny", full.train[:300], full.valid[:100], full.test[:100], "dynamic", (28, 28))


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run_dir)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "model.pt")
    return {f"{part}.{k}": v for part in ("model", "encoder") for k, v in state[part].items()}


def _assert_same_run(a: Path, b: Path) -> None:
    assert _metrics(a) == _metrics(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_training_improves_the_bound(tiny_data, tmp_path):
    train(TrainConfig(**{**TINY, "epochs": 6}), tmp_path, dataset=tiny_data)
    metrics = _metrics(tmp_path)
    assert len(metrics) == 6
    assert metrics[-1]["best_valid_elbo"] > metrics[0]["valid_elbo"] + 20


def test_same_seed_same_run_and_other_seed_differs(tiny_data, tmp_path):
    train(TrainConfig(**TINY), tmp_path / "a", dataset=tiny_data)
    train(TrainConfig(**TINY), tmp_path / "b", dataset=tiny_data)
    train(TrainConfig(**TINY, seed=1), tmp_path / "c", dataset=tiny_data)
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    assert _metrics(tmp_path / "a") != _metrics(tmp_path / "c")


@pytest.mark.parametrize("crash_at", ["after_checkpoint", "mid_epoch"])
def test_resume_after_crash_ends_like_uninterrupted_run(
    tiny_data, tmp_path, monkeypatch, crash_after_saves, crash_at
):
    config = TrainConfig(**TINY)
    train(config, tmp_path / "whole", dataset=tiny_data)

    import amortized.train.fit as fit_module  # the one loop that writes every checkpoint

    calls = {"n": 0}
    if crash_at == "after_checkpoint":
        crash_after_saves(fit_module, 2)
    else:
        real_step = torch.optim.Adam.step

        def crashing_step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 15:  # inside the third epoch (6 steps per epoch)
                raise KeyboardInterrupt
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", dataset=tiny_data)
    assert not (tmp_path / "killed" / "model.pt").exists()
    monkeypatch.undo()
    train(config, tmp_path / "killed", dataset=tiny_data)
    _assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_sigkill_at_random_points_then_resume(tmp_path):
    """A real SIGKILL of the command-line training, twice, then resume to the end."""
    full = load_dataset("mnist5k")
    data = tmp_path / "tiny.npz"
    np.savez(
        data, train=full.train[:600].numpy(), valid=full.valid[:100].numpy(),
        test=full.test[:100].numpy(),
    )  # fmt: skip
    args = [
        sys.executable, "-m", "amortized", "train", "--dataset", str(data), "--latent-dim", "2",
        "--hidden", "32", "--epochs", "30", "--batch-size", "20", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([*args, "--run-dir", str(tmp_path / "whole")], check=True, env=env)
    rng = np.random.default_rng(0)
    killed = tmp_path / "killed"
    for _ in range(2):
        proc = subprocess.Popen([*args, "--run-dir", str(killed)], env=env)
        deadline = time.time() + 60
        while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in a later epoch, or mid-save
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
        assert not (killed / "model.pt").exists()
    subprocess.run([*args, "--run-dir", str(killed)], check=True, env=env)
    _assert_same_run(tmp_path / "whole", killed)


def test_corrupt_checkpoint_is_reported_and_kept(tiny_data, tmp_path):
    config = TrainConfig(**TINY)
    train(config, tmp_path, dataset=tiny_data)
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(config, tmp_path, dataset=tiny_data)
    assert ckpt.read_bytes() == data[: len(data) // 2]  # nothing overwritten
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_run(tmp_path)


def test_every_damaged_checkpoint_is_refused_or_loads_intact(tmp_path):
    """Single bit flips anywhere in the file, tensor data included."""
    path = tmp_path / "c.pt"
    original = {"format": "t", "w": torch.randn(300, 20), "meta": {"epoch": 3, "lr": [1e-3]}}
    save_atomic(original, path)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    refused = 0
    for offset in rng.integers(0, len(data), 200):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            refused += 1
            continue
        # loaded: the flip hit bytes that carry nothing (zip padding, timestamps)
        assert torch.equal(loaded["w"], original["w"]) and loaded["meta"] == original["meta"]
    assert refused >= 150  # most of the file is content (measured: 187 of 200)


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"format": "x", "payload": Payload()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_atomic({"format": "t", "v": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"format": "t", "v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_resuming_with_another_config_is_refused(tiny_data, tmp_path):
    train(TrainConfig(**TINY), tmp_path, dataset=tiny_data)
    with pytest.raises(ConfigError, match=r"different config: lr \(0.001 there, 0.01 here\)"):
        train(TrainConfig(**{**TINY, "lr": 0.01}), tmp_path, dataset=tiny_data)
    before = _metrics(tmp_path)
    # where the data are read from is not part of a run: a moved data directory resumes
    train(TrainConfig(**{**TINY, "data_dir": str(tmp_path / "moved")}), tmp_path, dataset=tiny_data)
    assert _metrics(tmp_path) == before


def test_a_run_saved_before_new_config_fields_existed_resumes(tiny_data, tmp_path):
    config = TrainConfig(**TINY)
    train(config, tmp_path, dataset=tiny_data)
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    del state["config"]["free_bits"], state["config"]["kl_schedule"]  # an older run's config
    save_atomic(state, path)
    trained = train(config, tmp_path, dataset=tiny_data)  # refused if the fields were compared
    assert len(_metrics(tmp_path)) == 4 and trained.config == config


def test_each_epoch_scores_a_fixed_validation_subset_and_the_end_the_whole_split(tiny_data,
                                                                                 tmp_path):
    from amortized.train.bounds import evaluate_elbo
    from amortized.train.run import _completed

    sub = train(TrainConfig(**TINY, valid_points=30), tmp_path / "sub", dataset=tiny_data)
    train(TrainConfig(**TINY, valid_points=0), tmp_path / "whole", dataset=tiny_data)
    a, b = _metrics(tmp_path / "sub"), _metrics(tmp_path / "whole")
    # validation draws from a stream of its own: what it scores cannot change the training
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    assert a[0]["valid_elbo"] != b[0]["valid_elbo"]
    # the best epoch scored once on all 100 validation images at the end
    saved = load_checkpoint(tmp_path / "sub" / "model.pt")
    run = load_run(tmp_path / "sub")
    torch.manual_seed(0)
    valid = prepare_split(tiny_data, "valid", "bernoulli", 0)
    value = evaluate_elbo(run.model, run.encoder, run.family, valid, samples=500)
    assert abs(saved["valid_elbo_whole_split"] - value) < 0.5  # MC error of 10 samples each
    assert load_checkpoint(tmp_path / "whole" / "model.pt")["valid_elbo_whole_split"] == \
        _metrics(tmp_path / "whole")[-1]["best_valid_elbo"]  # fmt: skip
    assert sub.config.valid_points == 30
    # a run saved before the setting existed validated on the whole split: it says so
    config = to_dict(TrainConfig(**TINY))
    del config["valid_points"]
    assert _completed(config)["valid_points"] == 0


def test_what_is_measured_after_an_epoch_leaves_training_and_its_draws_alone(tiny_data,
                                                                            tmp_path):
    """Validation samples and latent diagnostics draw from streams of their own, the same
    every epoch: the trained model does not depend on how much is measured, and every
    epoch is scored under the same draws."""
    base = dict(**{**TINY, "epochs": 3}, diagnostics_points=0, valid_samples=2)
    train(TrainConfig(**base), tmp_path / "a", dataset=tiny_data)
    train(TrainConfig(**{**base, "diagnostics_points": 40, "valid_samples": 7}), tmp_path / "b",
          dataset=tiny_data)  # fmt: skip
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    assert "kl" in b[0] and a[0]["valid_elbo"] != b[0]["valid_elbo"]
    # the scores are those of the same draws: scoring the saved model again gives the
    # best epoch's score exactly
    from amortized.distributed import World
    from amortized.train import evaluation_subset
    from amortized.train.bounds import validation_elbo

    run = load_run(tmp_path / "a")
    valid = evaluation_subset(prepare_split(tiny_data, "valid", "bernoulli", 0),
                              run.config.valid_points, run.config.seed)  # fmt: skip
    again = validation_elbo(run.model, run.encoder, run.family, valid, run.config, World())
    assert again == pytest.approx(a[-1]["best_valid_elbo"], abs=1e-9)


def test_load_run_restores_the_best_model(tiny_data, tmp_path):
    trained = train(TrainConfig(**TINY), tmp_path, dataset=tiny_data)
    loaded = load_run(tmp_path)
    x = tiny_data.test[:5]
    assert torch.equal(trained.encoder(x), loaded.encoder(x))
    assert loaded.image_shape == (28, 28)


def test_iwae_objective_trains(tiny_data, tmp_path):
    train(TrainConfig(**TINY, objective="iwae", samples=3), tmp_path, dataset=tiny_data)
    metrics = _metrics(tmp_path)
    assert metrics[-1]["best_valid_elbo"] > metrics[0]["valid_elbo"]


def test_iaf_family_trains_its_shared_weights_and_burda_schedule_sets_the_rate(tiny_data, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 5}, family="iaf", lr_schedule="burda")
    trained = train(config, tmp_path, dataset=tiny_data)
    metrics = _metrics(tmp_path)
    assert metrics[-1]["best_valid_elbo"] > metrics[0]["valid_elbo"]
    # epochs 1 | 2-4 | 5 are Burda's stages 0, 1, 2
    expected = [1e-3, 1e-3 * 10 ** (-1 / 7), 1e-3 * 10 ** (-1 / 7), 1e-3 * 10 ** (-1 / 7),
                1e-3 * 10 ** (-2 / 7)]  # fmt: skip
    assert [m["lr"] for m in metrics] == pytest.approx(expected)
    head = trained.encoder.net[-1]
    assert head.w2.abs().sum() > 0  # the flow left the identity it started at
    reloaded = load_run(tmp_path)
    x = tiny_data.test[:4].bernoulli(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encoder(x), trained.encoder(x))


def test_a_flow_encoder_family_acts_where_its_run_says(tiny_data, tmp_path):
    """A run trains its flow family in the frame its config names (on z by default, as
    runs saved before the setting did), and loads it in that frame: loading one in the
    other would give another q for the same weights."""
    config = TrainConfig(**{**TINY, "epochs": 1}, family="iaf", flow_acts_on="noise")
    trained = train(config, tmp_path / "noise", dataset=tiny_data)
    loaded = load_run(tmp_path / "noise")
    assert loaded.family.acts_on == "noise" and loaded.config == config
    x = tiny_data.test[:4].bernoulli(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lam = trained.encoder(x)
        z = trained.family.distribution(lam).sample((3,))
        torch.testing.assert_close(loaded.family.distribution(lam).log_prob(z),
                                   trained.family.distribution(lam).log_prob(z))  # fmt: skip
        other = InverseAutoregressiveFlow(2, acts_on="latent")
        assert not torch.allclose(other.distribution(lam).log_prob(z),
                                  loaded.family.distribution(lam).log_prob(z))  # fmt: skip
    # resuming it in the other frame is refused, naming the setting
    with pytest.raises(ConfigError, match="flow_acts_on"):
        train(replace(config, epochs=2, flow_acts_on="latent"), tmp_path / "noise",
              dataset=tiny_data)  # fmt: skip
    # a run saved before the setting existed trained on z, today's default
    path = tmp_path / "old" / "model.pt"
    train(replace(config, flow_acts_on="latent"), tmp_path / "old", dataset=tiny_data)
    state = load_checkpoint(path)
    del state["config"]["flow_acts_on"]
    save_atomic(state, path)
    assert load_run(tmp_path / "old").family.acts_on == "latent"


def test_a_decoder_cut_off_from_z_logs_its_collapse_without_warning(tiny_data, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1, "diagnostics_points": 30}, decoder="made",
                         made_hidden=(16,), decoder_uses_z=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, tmp_path, dataset=tiny_data)
    assert not any("collapsing" in str(w.message) for w in caught)
    assert _metrics(tmp_path)[-1]["collapsing"]  # logged all the same


def test_cosine_schedule_sets_each_epochs_rate(tiny_data, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 4}, lr_schedule="cosine", lr=2e-3)
    train(config, tmp_path, dataset=tiny_data)
    # half a cosine from lr at epoch 1 towards 0 after epoch 4
    expected = [2e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert [m["lr"] for m in _metrics(tmp_path)] == pytest.approx(expected)


@pytest.mark.parametrize("inference", ["savae", "vae+svi", "svi", "iterative"])
def test_semi_amortized_and_svi_training_improve_the_refined_bound(tiny_data, tmp_path, inference):
    config = TrainConfig(**{**TINY, "epochs": 3}, inference=inference, svi_steps=3, iterations=2)
    trained = train(config, tmp_path, dataset=tiny_data)
    metrics = _metrics(tmp_path)
    assert metrics[-1]["best_valid_elbo"] > metrics[0]["valid_elbo"]
    # the run reloads, and its encoder serves the gap report like any other
    reloaded = load_run(tmp_path)
    x = tiny_data.test[:6].bernoulli(generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        first = trained.encoder(x)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encoder(x), first)
    report = gap_report(reloaded.model, x, reloaded.encoder, reloaded.family, iwae_k=10,
                        elbo_samples=10, local_kwargs={"steps": 5},
                        refine_steps=(0, 2))  # fmt: skip
    assert math.isfinite(report.amortization_gap.mean)


def test_each_inference_mode_routes_gradients_as_documented(tiny_data):
    torch.manual_seed(0)
    model, encoder, family = build(TrainConfig(**TINY), 784)
    x = tiny_data.train[:20].bernoulli(generator=torch.Generator().manual_seed(0))
    enc_params = list(encoder.parameters())

    def encoder_grads(value):
        grads = torch.autograd.grad(value.sum(), enc_params, allow_unused=True, retain_graph=True)
        pairs = zip(enc_params, grads, strict=True)
        return [torch.zeros_like(p) if g is None else g for p, g in pairs]

    bounds = {}
    for inference in ("amortized", "savae", "vae+svi", "svi"):  # iterative: own encoder
        config = TrainConfig(**TINY, inference=inference, svi_steps=5)
        torch.manual_seed(1)
        bounds[inference] = training_bounds(config, model, encoder, family, x)
    amortized, _ = bounds["amortized"]
    # refinement raises the bound the decoder learns from
    for inference in ("savae", "vae+svi", "svi"):
        gain = bounds[inference][0].detach().mean() - amortized.detach().mean()
        assert float(gain) > 0.5, inference
    # savae: one bound, and the encoder learns through the steps (not as the VAE would)
    savae_model, savae_encoder = bounds["savae"]
    assert savae_encoder is savae_model
    through_steps, plain = encoder_grads(savae_model), encoder_grads(amortized)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(through_steps, plain, strict=True))
    # vae+svi: the model's bound does not reach the encoder; the encoder has its own
    model_bound, encoder_bound = bounds["vae+svi"]
    assert all(float(g.abs().max()) == 0 for g in encoder_grads(model_bound))
    assert any(float(g.abs().max()) > 0 for g in encoder_grads(encoder_bound))
    # svi: no encoder at all
    svi_model, svi_encoder = bounds["svi"]
    assert svi_encoder is None
    assert all(float(g.abs().max()) == 0 for g in encoder_grads(svi_model))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"likelihood": "poisson"}, "likelihood"),
        ({"inference": "magic"}, "inference"),
        ({"svi_steps": -1}, "svi_steps"),
        ({"svi_method": "lbfgs"}, "svi_method"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"family": "flow"}, "family"),
        ({"objective": "vimco"}, "objective"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"kl_schedule": "cosine"}, "kl_schedule"),
        ({"free_bits": -0.5}, "free_bits must be"),
        ({"free_bits": 0.5, "free_bits_mode": "group"}, "free_bits_mode"),
        ({"free_bits": 0.5, "objective": "iwae"}, "free_bits needs objective elbo"),
        ({"free_bits": 0.5, "family": "iaf"}, "closed-form KL"),
        ({"diagnostics_points": 1}, "diagnostics_points"),
        ({"aggressive": True, "inference": "savae"}, "aggressive training is for"),
        ({"aggressive": True, "diagnostics_points": 0}, "aggressive training needs"),
        ({"decoder": "transformer"}, "decoder must be one of"),
        ({"pixelcnn_kernel": 4}, "pixelcnn_kernel"),
    ],
)
def test_bad_config_values(tiny_data, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(**{**TINY, **change}), tmp_path, dataset=tiny_data)


def test_gaussian_likelihood_refuses_nothing_bernoulli_refuses_grey(tmp_path):
    grey = Dataset("grey", torch.rand(50, 4), torch.rand(10, 4), torch.rand(10, 4), "none", None)
    config = TrainConfig(latent_dim=2, hidden=(8,), epochs=1, progress=False)
    from amortized.data import DataError

    with pytest.raises(DataError, match="binary"):
        train(config, tmp_path / "b", dataset=grey)
    train(
        TrainConfig(**{**TINY, "likelihood": "gaussian", "epochs": 1}), tmp_path / "g", dataset=grey
    )


def test_config_toml_round_trip_and_errors(tmp_path):
    config = TrainConfig(latent_dim=7, hidden=(30, 20), lr=0.5)
    save_config(config, tmp_path / "c.toml")
    assert load_config(TrainConfig, tmp_path / "c.toml") == config
    (tmp_path / "bad.toml").write_text("latent_dimm = 3\n")
    with pytest.raises(ConfigError, match="unknown setting latent_dimm"):
        load_config(TrainConfig, tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text('latent_dim = "three"\n')
    with pytest.raises(ConfigError, match="latent_dim: expected int"):
        load_config(TrainConfig, tmp_path / "bad2.toml")
    (tmp_path / "bad3.toml").write_text("latent_dim = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(TrainConfig, tmp_path / "bad3.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.toml")


def test_evaluation_subset_is_a_fixed_spread_out_sample():
    from amortized.train import evaluation_subset

    x = torch.arange(1000.0)[:, None]  # rows sorted, like binarized MNIST's test split
    a, b = evaluation_subset(x, 100), evaluation_subset(x, 100)
    assert torch.equal(a, b) and a.shape == (100, 1)
    assert (a[1:, 0] > a[:-1, 0]).all()  # distinct rows, in data order
    assert float(a.max()) > 900 and float(a.min()) < 100  # not the first 100
    assert evaluation_subset(x, 0) is x and evaluation_subset(x, 5000) is x


def test_iterative_update_is_a_gate_between_lambda_and_the_proposal():
    torch.manual_seed(0)
    model, _, family = build(TrainConfig(**TINY), 12)
    encoder = IterativeEncoder(model, family, 12, iterations=3, hidden=(5,))
    last = encoder.update[-1]
    p = family.num_params
    x = torch.ones(4, 12)
    with torch.no_grad():
        last.weight.zero_()
        last.bias[:p] = 0.7  # the proposal
        last.bias[p:] = -50.0  # gate shut: take the proposal
        torch.testing.assert_close(encoder(x), torch.full((4, p), 0.7))
        last.bias[p:] = 50.0  # gate open: keep lambda (the prior, zeros)
        torch.testing.assert_close(encoder(x), torch.zeros(4, p))
        last.bias[p:] = 0.0  # half way, iterated: 0.35, 0.525, 0.6125
        torch.testing.assert_close(encoder(x), torch.full((4, p), 0.6125))
    with pytest.raises(ValueError, match="12 values"):
        encoder(torch.ones(4, 5))


def test_iterative_inference_from_an_encoder_starts_at_its_output_and_trains_it(
    tiny_data, tmp_path
):
    torch.manual_seed(0)
    model, _, family = build(TrainConfig(**TINY), 784)
    encoder = IterativeEncoder(model, family, 784, iterations=2, hidden=(5,), start="encoder")
    x = tiny_data.train[:4].round()
    last = encoder.update[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias[family.num_params :] = 50.0  # gate open: every update keeps lambda_0
        torch.testing.assert_close(encoder(x), encoder.initial(x))
    with pytest.raises(ValueError, match="start must be one of"):
        IterativeEncoder(model, family, 784, start="posterior")
    # trained end to end: the initial encoder gets gradients through the updates
    config = TrainConfig(**{**TINY, "epochs": 2}, inference="iterative", iterations=2,
                         iterative_start="encoder")  # fmt: skip
    trained = train(config, tmp_path, dataset=tiny_data)
    assert trained.encoder.initial is not None
    torch.manual_seed(config.seed)  # as train() does before building
    before = build(config, 784)[1].initial.net[0].weight
    assert not torch.equal(trained.encoder.initial.net[0].weight, before)


def test_non_finite_losses_and_gradients_are_skipped_with_a_warning(
    tiny_data, tmp_path, monkeypatch
):
    import amortized.train.bounds as train_module  # where the loop finds its bounds

    real, calls = train_module.training_bounds, {"n": 0}

    def sabotaged(config, model, encoder, family, x, beta=1.0, route=None):
        calls["n"] += 1
        value, _ = real(config, model, encoder, family, x, beta, route=route)
        if calls["n"] == 2:  # finite loss, NaN gradient: d sqrt(u)/du at u = 0 times 0
            u = sum(p.sum() for p in model.parameters()) * 0
            value = value + torch.sqrt(u)
        if calls["n"] == 4:  # non-finite loss
            value = value * float("nan")
        return value, value

    monkeypatch.setattr(train_module, "training_bounds", sabotaged)
    with pytest.warns(UserWarning, match="non-finite") as caught:
        trained = train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, dataset=tiny_data)
    messages = [str(w.message) for w in caught]
    assert any("non-finite gradient at step 2" in m for m in messages)
    assert any("non-finite loss at step 4" in m for m in messages)
    assert _metrics(tmp_path)[0]["skipped_steps"] == 2
    for p in [*trained.model.parameters(), *trained.encoder.parameters()]:
        assert torch.isfinite(p).all()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_every_epoch_logs_the_latent_code_and_warns_when_it_collapses(tiny_data, tmp_path):
    from amortized.measure.diagnostics import latent_diagnostics
    from amortized.train import evaluation_subset, prepare_split

    config = TrainConfig(**{**TINY, "epochs": 3, "diagnostics_points": 60, "warmup_epochs": 0})
    with pytest.warns(UserWarning, match="latent code collapsing") as caught:
        trained = train(config, tmp_path / "a", dataset=tiny_data)
    records = _metrics(tmp_path / "a")
    last = records[-1]
    assert len(last["kl_per_dim"]) == 2
    assert last["kl"] == pytest.approx(sum(last["kl_per_dim"]), rel=1e-5)
    assert 0 <= last["active_units"] <= 2 and last["mutual_information"] <= math.log(60) + 1e-6
    # warned once, at the first epoch that collapsed, however many did
    first = next(r["epoch"] for r in records if r["collapsing"])
    warned = [str(w.message) for w in caught if "collapsing" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith(f"epoch {first}:")
    # during a KL warm-up a small KL is the schedule's doing: logged, never warned of
    with warnings.catch_warnings(record=True) as during:
        warnings.simplefilter("always")
        train(replace(config, warmup_epochs=10.0), tmp_path / "warm-up", dataset=tiny_data)
    assert not any("collapsing" in str(w.message) for w in during)
    # the logged values are those of the final encoder on the same validation points
    x = evaluation_subset(prepare_split(tiny_data, "valid", "bernoulli", 0), 60, 0)
    checkpoint = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    trained.encoder.load_state_dict(checkpoint["encoder"])
    with torch.no_grad():
        diag = latent_diagnostics(trained.family, trained.encoder(x), trained.model.prior)
    assert diag.kl == pytest.approx(last["kl"], rel=1e-5)
    assert diag.active_units == last["active_units"]
    # off: no diagnostics in the log
    train(TrainConfig(**{**TINY, "epochs": 1, "diagnostics_points": 0}), tmp_path / "b",
          dataset=tiny_data)  # fmt: skip
    assert "kl" not in _metrics(tmp_path / "b")[0]


@pytest.mark.parametrize("mode", ["dimension", "total"])
def test_free_bits_floor_the_kl_and_stop_its_gradient_below_the_floor(tiny_data, mode):
    from amortized.estimators import elbo
    from amortized.measure.diagnostics import kl_per_dimension

    torch.manual_seed(0)
    config = TrainConfig(**{**TINY, "latent_dim": 3, "free_bits": 0.5, "free_bits_mode": mode})
    model, encoder, family = build(config, 784)
    x = tiny_data.train[:20].round()
    lam = encoder(x)
    # shrink dimension 0 toward the prior so its KL falls under the floor; widen 1 and 2
    lam = lam * torch.tensor([0.01, 1, 1, 0.01, 1, 1]) + torch.tensor([0, 2.0, -2, 0, 0, 0])
    lam = lam.detach().requires_grad_(True)
    kl = kl_per_dimension(family, lam, model.prior)
    means = kl.mean(0)
    assert means[0] < 0.5 < means[1] and means[2] > 0.5
    torch.manual_seed(1)
    bound = training_bounds(config, model, encoder, family, x)[0]  # encoder's own lam
    assert bound.shape == (20,)
    from amortized.train.loop import _objective

    torch.manual_seed(1)
    value = _objective(config, model, family, lam, x, beta=0.7)
    torch.manual_seed(1)
    reconstruction = elbo(model, family, lam, x, 1, beta=0.0)
    if mode == "dimension":
        floored = torch.stack([torch.full((20,), 0.5), kl[:, 1], kl[:, 2]], 1).sum(1)
    else:  # the total is above the floor: plain KL
        floored = kl.sum(1)
    assert torch.allclose(value, reconstruction - 0.7 * floored, atol=1e-4)
    (grad,) = torch.autograd.grad(value.mean(), lam)
    # the KL of a floored dimension sends no gradient: only the likelihood moves it
    (rec_grad,) = torch.autograd.grad(reconstruction.mean(), lam)
    d = 3
    for j in range(d):
        columns = [j, d + j]
        floored_j = mode == "dimension" and j == 0
        same = torch.allclose(grad[:, columns], rec_grad[:, columns], atol=1e-6)
        assert same == floored_j, (j, mode)


def test_pixelcnn_decoder_trains_reloads_and_needs_images(tiny_data, tmp_path):
    pixelcnn = {"decoder": "pixelcnn", "pixelcnn_channels": 4, "pixelcnn_layers": 2,
                "pixelcnn_kernel": 3}  # fmt: skip
    config = TrainConfig(**{**TINY, "epochs": 2, **pixelcnn})
    trained = train(config, tmp_path / "run", dataset=tiny_data)
    metrics = _metrics(tmp_path / "run")
    assert all(math.isfinite(m["valid_elbo"]) for m in metrics)
    assert metrics[-1]["valid_elbo"] > metrics[0]["valid_elbo"]
    loaded = load_run(tmp_path / "run")
    x, z = tiny_data.valid[:5].round(), torch.randn(3, 5, 2)
    with torch.no_grad():
        assert torch.equal(trained.model.log_likelihood(x, z), loaded.model.log_likelihood(x, z))
    flat = Dataset("flat", tiny_data.train, tiny_data.valid, tiny_data.test, "dynamic", None)
    with pytest.raises(ConfigError, match="needs images of shape"):
        train(config, tmp_path / "flat", dataset=flat)
    with pytest.raises(ConfigError, match="likelihood must be bernoulli"):
        train(TrainConfig(**{**TINY, **pixelcnn, "likelihood": "gaussian"}), tmp_path / "g",
              dataset=tiny_data)  # fmt: skip


def test_made_decoder_trains_reloads_and_needs_binary_data(tiny_data, tmp_path):
    made = {"decoder": "made", "made_hidden": (30,)}
    trained = train(TrainConfig(**{**TINY, "epochs": 2, **made}), tmp_path / "run",
                    dataset=tiny_data)  # fmt: skip
    metrics = _metrics(tmp_path / "run")
    assert metrics[-1]["valid_elbo"] > metrics[0]["valid_elbo"]
    loaded = load_run(tmp_path / "run")
    assert loaded.config.made_hidden == (30,)
    x, z = tiny_data.valid[:5].round(), torch.randn(3, 5, 2)
    with torch.no_grad():
        assert torch.equal(trained.model.log_likelihood(x, z), loaded.model.log_likelihood(x, z))
    with pytest.raises(ConfigError, match="likelihood must be bernoulli"):
        train(TrainConfig(**{**TINY, **made, "likelihood": "gaussian"}), tmp_path / "g",
              dataset=tiny_data)  # fmt: skip
    with pytest.raises(ConfigError, match="made_hidden"):
        build(TrainConfig(**{**TINY, **made, "made_hidden": ()}), 784)


def test_aggressive_encoder_steps_move_the_encoder_only_until_its_loss_stalls(tiny_data):
    from amortized.train.loop import (
        AGGRESSIVE_MAX_STEPS,
        AGGRESSIVE_WINDOW,
        _aggressive_encoder_steps,
    )

    torch.manual_seed(0)
    config = TrainConfig(**{**TINY, "aggressive": True})
    model, encoder, family = build(config, 784)
    optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoder_before = [p.detach().clone() for p in encoder.parameters()]
    x = tiny_data.train.round()
    g = torch.Generator().manual_seed(0)
    taken = _aggressive_encoder_steps(
        config,
        model,
        encoder,
        family,
        optimizer,
        lambda: x[torch.randint(300, (50,), generator=g)],
        1.0,
    )
    # at least two windows are compared; the first can never stall
    assert 2 * AGGRESSIVE_WINDOW <= taken <= AGGRESSIVE_MAX_STEPS
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(
        not torch.equal(a, b) for a, b in zip(encoder_before, encoder.parameters(), strict=True)
    )


def test_aggressive_training_switches_off_when_mutual_information_stops_rising(
    tiny_data, tmp_path, monkeypatch
):
    import amortized.train.loop as train_module

    mi = iter([1.0, 0.5, 2.0, 3.0])  # falls at epoch 2: plain VAE from epoch 3 on
    real = train_module._latent_record

    def record(*args, **kwargs):
        return {**real(*args, **kwargs), "mutual_information": next(mi)}

    monkeypatch.setattr(train_module, "_latent_record", record)
    config = TrainConfig(**{**TINY, "aggressive": True, "diagnostics_points": 50})
    train(config, tmp_path, dataset=tiny_data)
    metrics = _metrics(tmp_path)
    assert [m["aggressive"] for m in metrics] == [True, True, False, False]
    steps = [m["encoder_steps"] for m in metrics]
    assert steps[0] >= 2 * 15 * 6 and steps[1] > 0 and steps[2:] == [0, 0]


def test_an_aggressive_run_killed_after_a_checkpoint_resumes_exactly(
    tiny_data, tmp_path, monkeypatch, crash_after_saves
):
    import amortized.train.fit as fit_module

    config = TrainConfig(**{**TINY, "aggressive": True, "diagnostics_points": 50})
    train(config, tmp_path / "whole", dataset=tiny_data)
    crash_after_saves(fit_module, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", dataset=tiny_data)
    monkeypatch.undo()
    train(config, tmp_path / "killed", dataset=tiny_data)
    _assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_gradient_clipping_scales_the_total_norm_down_and_only_down():
    from amortized.train.loop import _finite_gradients

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([a, b], lr=1.0)

    def set_grads(scale):
        a.grad = torch.tensor([3.0, 0.0, 4.0]) * scale  # norm 5 * scale
        b.grad = torch.zeros(4)

    set_grads(2.0)  # total norm 10
    assert _finite_gradients(optimizer, max_norm=1.0)
    assert float(torch.linalg.vector_norm(torch.cat([a.grad, b.grad]))) == pytest.approx(1.0, 1e-5)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)  # direction kept
    set_grads(2.0)
    assert _finite_gradients(optimizer, max_norm=100.0)
    assert torch.equal(a.grad, torch.tensor([6.0, 0.0, 8.0]))  # under the cap: untouched
    set_grads(float("nan"))
    assert not _finite_gradients(optimizer, max_norm=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_unclipped_check_finds_any_inf_or_nan_and_leaves_gradients_as_they_are(dtype):
    from amortized.train.loop import _finite_gradients

    a = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(2, 3, dtype=dtype))
    c = torch.nn.Parameter(torch.zeros(2, dtype=dtype))  # no gradient: not checked
    optimizer = torch.optim.SGD([a, b, c], lr=1.0)
    g = torch.linspace(-3.0, 7.0, 11, dtype=dtype) * 1e30  # finite, its norm overflows float32
    a.grad, b.grad = g[:5].clone(), g[5:].view(2, 3).clone()
    assert _finite_gradients(optimizer)
    assert torch.equal(a.grad, g[:5]) and torch.equal(b.grad, g[5:].view(2, 3))  # untouched
    for bad in (float("inf"), -float("inf"), float("nan")):
        b.grad = g[5:].view(2, 3).clone()
        b.grad[1, 2] = bad
        assert not _finite_gradients(optimizer)
    b.grad = None
    assert _finite_gradients(optimizer)
    a.grad = None
    assert _finite_gradients(optimizer)  # nothing to check


def test_a_clip_that_never_binds_changes_nothing_and_one_that_binds_changes_the_run(
    tiny_data, tmp_path
):
    train(TrainConfig(**TINY), tmp_path / "free", dataset=tiny_data)
    train(TrainConfig(**TINY, grad_clip=1e9), tmp_path / "loose", dataset=tiny_data)
    train(TrainConfig(**TINY, grad_clip=1e-3), tmp_path / "tight", dataset=tiny_data)
    assert _metrics(tmp_path / "loose") == _metrics(tmp_path / "free")
    loss = [m["train_loss"] for m in _metrics(tmp_path / "tight")]
    assert loss != [m["train_loss"] for m in _metrics(tmp_path / "free")]
    with pytest.raises(ConfigError, match="grad_clip"):
        train(TrainConfig(**TINY, grad_clip=-1.0), tmp_path / "bad", dataset=tiny_data)


@pytest.mark.parametrize("lr", [1.0, 1e308])
def test_diverged_training_stops_with_a_clear_error_and_saves_nothing_of_it(
    tiny_data, tmp_path, lr
):
    from amortized.train import TrainingDiverged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each skipped step warns
        with pytest.raises(TrainingDiverged, match=r"training diverged in epoch (\d)") as err:
            train(TrainConfig(**{**TINY, "lr": lr}), tmp_path, dataset=tiny_data)
    epoch = int(err.value.args[0].split("epoch ")[1].split(":")[0])
    assert not (tmp_path / "model.pt").exists()  # no "trained model"
    assert len(read_metrics(tmp_path)) == epoch - 1  # the epochs before it, not it
    if epoch > 1:  # what was saved is the last finite epoch
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        assert state["epoch"] == epoch - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    else:
        assert not (tmp_path / "checkpoint.pt").exists()


def test_a_busy_run_directory_is_refused_naming_its_holder(tiny_data, tmp_path):
    from amortized.files import DirectoryBusy, lock_directory

    config = TrainConfig(**{**TINY, "epochs": 1})
    holder = subprocess.Popen(  # another process holds the directory until told to stop
        [sys.executable, "-c", "import sys; from amortized.files import lock_directory\n"
         f"with lock_directory({str(tmp_path)!r}):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=rf"in use by process {holder.pid} on "):
            train(config, tmp_path, dataset=tiny_data)
    finally:
        holder.communicate("", timeout=30)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was written meanwhile
    with lock_directory(tmp_path):  # this process may take its own lock again
        train(config, tmp_path, dataset=tiny_data)  # released: the run goes ahead
    assert len(read_metrics(tmp_path)) == 1


def test_a_finished_run_without_its_checkpoint_is_never_replaced(tiny_data, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1})
    train(config, tmp_path, dataset=tiny_data)
    (tmp_path / "checkpoint.pt").unlink()
    weights = (tmp_path / "model.pt").read_bytes()
    with pytest.raises(ConfigError, match="holds another run, and its checkpoint.pt is missing"):
        train(replace(config, lr=0.01), tmp_path, dataset=tiny_data)
    assert (tmp_path / "model.pt").read_bytes() == weights
    assert len(read_metrics(tmp_path)) == 1
    train(config, tmp_path, dataset=tiny_data)  # the same run again: allowed, and the same
    assert _weights(tmp_path).keys() and len(read_metrics(tmp_path)) == 1


def test_every_epoch_s_scalars_go_to_tensorboard_when_asked(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(**{**TINY, "epochs": 3, "tensorboard": True})
    train(config, tmp_path, dataset=tiny_data)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = read_metrics(tmp_path)
    for key in ("valid_elbo", "train_loss", "beta", "kl", "mutual_information"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(m["epoch"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key
    assert "kl_per_dim" not in events.Tags()["scalars"]  # lists are not scalars
    # where TensorBoard is written is not what the run is: it resumes as the same run
    again = train(replace(config, tensorboard=False), tmp_path, dataset=tiny_data)
    assert again.run_dir == tmp_path and len(read_metrics(tmp_path)) == 3


def test_gaps_over_training_are_the_gap_report_s_at_that_epoch(tiny_data, tmp_path):
    """gap_every: the gaps logged at an epoch are gap_report's on the model of that epoch,
    the same subsets and settings and seed; and training itself is unchanged by them."""
    from amortized.measure.gaps import gap_report
    from amortized.train import evaluation_subset, prepare_split
    from amortized.train.loop import GAPS_OVER_TRAINING

    config = TrainConfig(**{**TINY, "epochs": 3, "gap_every": 2, "gap_points": 20})
    trained = train(config, tmp_path / "gaps", dataset=tiny_data)
    train(replace(config, gap_every=0), tmp_path / "plain", dataset=tiny_data)
    logged = read_metrics(tmp_path / "gaps")
    assert [("gaps" in m) for m in logged] == [False, True, False]
    without = [{k: v for k, v in m.items() if k not in ("gaps", "seconds")} for m in logged]
    assert without == _metrics(tmp_path / "plain")  # the gaps cost time, not results
    assert _weights(tmp_path / "gaps").keys() == _weights(tmp_path / "plain").keys()
    # the model of epoch 2: the same run trained for 2 epochs, its last weights
    two = train(replace(config, epochs=2), tmp_path / "two", dataset=tiny_data)
    state = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    two.model.load_state_dict(state["model"])
    two.encoder.load_state_dict(state["encoder"])
    x = evaluation_subset(prepare_split(tiny_data, "valid", "bernoulli", 0), 20, 0)
    report = gap_report(two.model, x, two.encoder, two.family, seed=0, **GAPS_OVER_TRAINING)
    gaps = logged[1]["gaps"]["valid"]
    assert gaps["amortization"] == report.amortization_gap.mean
    assert gaps["approximation"] == report.approximation_gap["diagonal"].mean
    assert set(logged[1]["gaps"]) == {"train", "valid"}
    assert trained.run_dir == tmp_path / "gaps"
