"""Adapters for pythae and Pyro, checked against the libraries themselves: the same
likelihood and q term by term, their ELBOs and pythae's ``get_nll`` within Monte Carlo
error, and the whole gap report through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amortized import LatentVariableModel, elbo, fit_local, iwae_bound
from amortized.adapters import from_pyro, from_pythae
from amortized.apps.cli import main
from amortized.apps.study import measure_gaps
from amortized.config import ConfigError, GapConfig, TrainConfig
from amortized.train import Trained

pythae_models = pytest.importorskip("pythae.models", reason="pythae is not installed")
pyro = pytest.importorskip("pyro", reason="pyro-ppl is not installed")
dist = pyro.distributions

SHAPE, LATENT = (1, 4, 5), 3  # 20 pixels as pythae's image networks see them
D = math.prod(SHAPE)


def _binary(n: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, D, generator=torch.Generator().manual_seed(seed)))


def _pythae_vae(loss: str = "bce", kind: str = "VAE", seed: int = 0):
    torch.manual_seed(seed)
    config = getattr(pythae_models, f"{kind}Config")(input_dim=SHAPE, latent_dim=LATENT,
                                                    reconstruction_loss=loss)  # fmt: skip
    return getattr(pythae_models, kind)(config).eval()


def _within(a: float, b: float, se: float, what: str) -> None:
    assert abs(a - b) < 4 * se, f"{what}: {a:.4f} against {b:.4f}, 4 s.e. = {4 * se:.4f}"


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_pythae_s_likelihood_and_q_are_the_library_s_own(loss):
    vae = _pythae_vae(loss)
    model, encoder, family = from_pythae(vae)
    x = _binary(7)
    with torch.no_grad():
        out = vae.encoder(x.view(7, *SHAPE))
        lam = encoder(x)
        z = torch.randn(7, LATENT)
        recon = vae.decoder(z)["reconstruction"].reshape(7, D)
        ours = model.log_likelihood(x, z)
    assert torch.equal(lam, torch.cat([out.embedding, 0.5 * out.log_covariance], -1))
    if loss == "bce":  # pythae's loss term, clipped logs included
        theirs = -F.binary_cross_entropy(recon, x, reduction="none").sum(-1)
    else:  # pythae's 0.5 * squared error, with the unit Gaussian's constant
        theirs = -0.5 * (recon - x).square().sum(-1) - D / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    q = family.distribution(lam)
    torch.testing.assert_close(q.stddev.square(), out.log_covariance.exp(), rtol=1e-6, atol=0)


def test_a_saturated_pythae_decoder_is_scored_as_pythae_scores_it():
    vae = _pythae_vae()
    model, _, _ = from_pythae(vae)
    last = vae.decoder.layers[-1][0]  # Linear before the sigmoid: push pixel 0 to p = 1
    with torch.no_grad():
        last.bias[0] = 1e3
        x = torch.zeros(2, D)
        got = model.log_likelihood(x, torch.zeros(2, LATENT))
        recon = vae.decoder(torch.zeros(2, LATENT))["reconstruction"].reshape(2, D)
    assert recon[0, 0] == 1.0  # log(1 - p) is -inf; binary_cross_entropy clips it at -100
    torch.testing.assert_close(got, -F.binary_cross_entropy(recon, x, reduction="none").sum(-1))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_pythae_s_elbo_and_get_nll_agree_with_ours_within_monte_carlo_error(loss):
    vae, x = _pythae_vae(loss, seed=1), _binary(40, seed=1)
    model, encoder, family = from_pythae(vae)
    torch.manual_seed(2)
    with torch.no_grad():
        lam = encoder(x)
        ours, ours_se = elbo(model, family, lam, x, samples=2000, stderr=True)
        # pythae's loss: one draw per image, averaged; 300 calls give its mean and error
        losses = torch.stack([vae({"data": x.view(40, *SHAPE)}).loss for _ in range(300)])
        constant = 0.0 if loss == "bce" else -D / 2 * math.log(2 * math.pi)
        theirs = -losses.mean().item() + constant
        se = math.hypot(ours_se.square().sum().sqrt().item() / 40, losses.std().item() / 300**0.5)
        _within(ours.mean().item(), theirs, se, "ELBO")
        # get_nll: IWAE-k with pythae's own encoder as proposal (it returns the mean log p(x))
        k = 400
        runs = [vae.get_nll(x.view(40, *SHAPE), n_samples=k, batch_size=k) for _ in range(4)]
        ours_k, ours_k_se = iwae_bound(model, family, lam, x, k=k, stderr=True)
    se = math.hypot(ours_k_se.square().sum().sqrt().item() / 40, np.std(runs, ddof=1) / 2)
    _within(ours_k.mean().item(), float(np.mean(runs)), se, "IWAE against get_nll")


def test_pythae_s_iwae_is_accepted_and_models_of_other_kinds_are_refused_in_one_line():
    model, _, family = from_pythae(_pythae_vae(kind="IWAE"))
    assert family.latent_dim == model.latent_dim == LATENT
    with pytest.raises(ConfigError, match="VAMP is not a Gaussian-encoder VAE"):
        from_pythae(_pythae_vae(kind="VAMP"))


def test_a_saved_pythae_folder_on_the_command_line_gives_the_python_api_s_report(tmp_path):
    vae = _pythae_vae(seed=3)
    vae.save(str(tmp_path / "vae"))
    x = _binary(30, seed=4)
    data = tmp_path / "x.npz"
    np.savez(data, train=_binary(30, seed=5).numpy(), valid=_binary(30, seed=6).numpy(),
             test=x.numpy())  # fmt: skip
    out = tmp_path / "report.json"
    gap = ["--max-points", "30", "--iwae-k", "40", "--elbo-samples", "10", "--local-steps",
           "30", "--eval-batch-size", "15", "--refine-steps", "0,3", "--no-progress"]  # fmt: skip
    assert main(["gap", "--model", f"pythae:{tmp_path / 'vae'}", "--dataset", str(data),
                 "--output", str(out), *gap]) == 0  # fmt: skip
    cli = json.loads(out.read_text())
    model, encoder, family = from_pythae(vae)
    config = GapConfig(max_points=30, iwae_k=40, elbo_samples=10, local_steps=30,
                       eval_batch_size=15, refine_steps=(0, 3))  # fmt: skip
    trained = Trained(model, encoder, family, TrainConfig(latent_dim=LATENT))
    api = measure_gaps(trained, x, config, progress=False).to_dict()
    for key in ("log_px", "elbo_amortized", "elbo_local", "amortization_gap", "refinement"):
        assert json.dumps(cli[key]) == json.dumps(api[key]), key


def test_pythae_mistakes_on_the_command_line_are_one_line(tmp_path, capsys):
    vae = _pythae_vae()
    vae.save(str(tmp_path / "vae"))
    for args, said in (
        (["--model", f"pythae:{tmp_path / 'nothing'}"], "cannot load a pythae model from"),
        (["--model", f"pythae:{tmp_path / 'vae'}"], r"takes datapoints of shape \(1, 4, 5\)"),
    ):
        assert main(["gap", *args, "--max-points", "5", "--no-progress"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and __import__("re").search(said, err[0]), err


class PyroVAE(nn.Module):
    """Pyro's VAE tutorial, small: z ~ N(0, I), x ~ Bernoulli(decoder(z)), a Normal guide."""

    def __init__(self, prior_scale: float = 1.0):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, D))
        self.encoder = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 2 * LATENT))
        self.prior_scale = prior_scale

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], LATENT)
            z = pyro.sample("z", dist.Normal(loc, self.prior_scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            out = self.encoder(x)
            pyro.sample("z", dist.Normal(out[:, :LATENT], out[:, LATENT:].exp()).to_event(1))


@pytest.mark.parametrize("prior_scale", [1.0, 2.5])
def test_pyro_s_elbo_agrees_with_ours_within_monte_carlo_error(prior_scale):
    pyro.clear_param_store()
    torch.manual_seed(5)
    vae, x = PyroVAE(prior_scale), _binary(30, seed=5)
    model, encoder, family = from_pyro(vae.model, vae.guide, D)
    with torch.no_grad():
        lam = encoder(x)
        ours, ours_se = elbo(model, family, lam, x, samples=2000, stderr=True)
        # Pyro's own estimate: independent batches of particles give its mean and error
        loss = pyro.infer.Trace_ELBO(num_particles=500, vectorize_particles=True,
                                     max_plate_nesting=1)  # fmt: skip
        runs = torch.tensor([-loss.loss(vae.model, vae.guide, x) / 30 for _ in range(8)])
    se = math.hypot(ours_se.square().sum().sqrt().item() / 30, runs.std().item() / 8**0.5)
    _within(ours.mean().item(), runs.mean().item(), se, "ELBO")
    # the model's terms exactly: log p(x|z) and log p(z) as Pyro's trace scores them
    z = torch.randn(30, LATENT)
    trace = pyro.poutine.trace(pyro.poutine.condition(vae.model, data={"z": z})).get_trace(x)
    trace.compute_log_prob()
    torch.testing.assert_close(model.log_joint(x, z),
                               trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"])


def test_a_pyro_prior_of_another_kind_is_scored_and_sampled_as_pyro_does():
    vae = PyroVAE()

    def laplace_model(x):
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], LATENT)
            z = pyro.sample("z", dist.Laplace(loc, 0.5).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=vae.decoder(z)).to_event(1), obs=x)

    model, _, _ = from_pyro(laplace_model, vae.guide, D)
    x, z = _binary(6), torch.randn(4, 6, LATENT)
    with torch.no_grad():
        prior = dist.Laplace(torch.zeros(LATENT), 0.5).to_event(1)
        likelihood = dist.Bernoulli(logits=vae.decoder(z)).to_event(1)
        torch.testing.assert_close(model.log_joint(x, z),
                                   prior.log_prob(z) + likelihood.log_prob(x))  # fmt: skip
        assert model.sample(9).shape == (9, D)


class _Native(nn.Module):
    """The Pyro model's decoder network, as a decoder of this library."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z):
        return torch.distributions.Independent(torch.distributions.Bernoulli(
            logits=self.net(z), validate_args=False), 1)  # fmt: skip


def test_q_star_of_a_pyro_model_is_that_of_the_same_model_written_here():
    pyro.clear_param_store()
    torch.manual_seed(6)
    vae, x = PyroVAE(), _binary(20, seed=6)
    model, encoder, family = from_pyro(vae.model, vae.guide, D)
    native = LatentVariableModel(_Native(vae.decoder), LATENT)
    with torch.no_grad():
        start = encoder(x)
    fits = {}
    for name, m in (("pyro", model), ("native", native)):
        torch.manual_seed(7)
        fits[name] = fit_local(m, family, x, init=start, steps=200).lam
    torch.testing.assert_close(fits["pyro"], fits["native"], rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        before, se = elbo(model, family, start, x, samples=500, stderr=True)
        after = elbo(model, family, fits["pyro"], x, samples=500)
    assert (after - before).mean() > 4 * se.square().sum().sqrt() / 20  # q* beats the guide


def test_pyro_models_the_adapter_cannot_read_are_one_line():
    vae = PyroVAE()

    def two_latents(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("b", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))

    def laplace_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Laplace(x.new_zeros(x.shape[0], LATENT), 1.0).to_event(1))

    def broken(x):
        raise RuntimeError("no such layer")

    for args, said in (
        ((two_latents, vae.guide), "2 latent sites"),
        ((vae.model, laplace_guide), r"is Laplace\(\.\.\.\)\.to_event\(1\); the adapter"),
        ((broken, vae.guide), "the model raised RuntimeError: no such layer"),
        ((vae.model, broken), "the guide raised RuntimeError"),
    ):
        with pytest.raises(ConfigError, match=said):
            from_pyro(*args, D)


def test_the_pyro_example_runs_on_the_command_line(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "pyro_vae.py"
    out = tmp_path / "report.json"
    assert main(["gap", "--model", f"{example}:build", "--max-points", "10", "--iwae-k", "20",
                 "--elbo-samples", "5", "--local-steps", "20", "--refine-steps", "0,2",
                 "--output", str(out), "--no-progress"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["n"] == 10 and math.isfinite(report["amortization_gap"]["mean"])
