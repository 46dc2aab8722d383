"""VQ-VAE: nearest codes, straight-through gradients, EMA codebook, bounds and perplexity."""

import itertools
import math

import pytest
import torch

from amortized.nets.vqvae import VQVAE, CodePrior, codebook_perplexity


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return VQVAE(data_dim=6, latents=2, code_dim=3, codebook_size=3, hidden=(8,))


def test_codes_are_the_nearest_codebook_entries_and_gradients_pass_straight_through(tiny):
    x = torch.bernoulli(torch.full((20, 6), 0.5))
    z_e = tiny.encode(x)
    brute = ((z_e.unsqueeze(-2) - tiny.quantizer.codebook) ** 2).sum(-1).argmin(-1)
    assert torch.equal(tiny.codes(x), brute)
    tiny.eval()  # no codebook update: forward's codes are the same
    assert torch.equal(tiny(x)["codes"], brute)
    # straight through (in training): d quantized / d z_e is the identity
    tiny.train()
    codebook = tiny.quantizer.codebook.clone()  # before this step's EMA update
    z = z_e.detach().requires_grad_(True)
    quantized, _, _ = tiny.quantizer(z)
    weights = torch.randn_like(z)
    (grad,) = torch.autograd.grad((quantized * weights).sum(), z)
    assert torch.equal(grad, weights)
    assert torch.allclose(quantized, codebook[brute], atol=1e-6)
    # the loss reaches the encoder through the quantizer
    tiny.zero_grad()
    tiny.loss(x).backward()
    assert tiny.encoder[0].weight.grad.abs().sum() > 0


def test_commitment_is_beta_times_the_squared_distance_to_the_code(tiny):
    tiny.eval()
    x = torch.bernoulli(torch.full((7, 6), 0.5))
    out = tiny(x)
    e = tiny.quantizer.codebook[out["codes"]]
    by_hand = ((tiny.encode(x) - e) ** 2).sum((-1, -2))
    assert torch.allclose(out["commitment"], by_hand, atol=1e-6)
    expected = (0.25 * by_hand - out["log_likelihood"]).mean()
    assert float(tiny.loss(x)) == pytest.approx(float(expected), rel=1e-6)


def test_ema_moves_a_code_to_the_mean_of_its_inputs_and_restarts_dead_codes():
    torch.manual_seed(0)
    points = torch.tensor([[3.0, 3.0], [3.2, 2.8]]).repeat(10, 1).unsqueeze(1)  # (20, 1, 2)
    one = VQVAE(data_dim=4, latents=1, code_dim=2, codebook_size=1, hidden=(8,), decay=0.5)
    one.train()
    for _ in range(40):
        one.quantizer(points)
    # a single code takes every input: it converges to their mean
    assert torch.allclose(one.quantizer.codebook, torch.tensor([[3.1, 2.9]]), atol=1e-4)
    four = VQVAE(data_dim=4, latents=1, code_dim=2, codebook_size=4, hidden=(8,), decay=0.5)
    start = four.quantizer.codebook.clone()
    assert float(torch.cdist(start, points[:2, 0]).min()) > 1.0  # all codes far from the data
    four.train()
    for _ in range(40):
        four.quantizer(points)
    # codes that no input chose were restarted at inputs: every code now sits on a point
    # (its cluster's mean), and both points have a code
    distances = torch.cdist(four.quantizer.codebook, points[:2, 0])  # (4 codes, 2 points)
    assert float(distances.min(1).values.max()) < 1e-3
    assert float(distances.min(0).values.max()) < 1e-3


def _all_codes(k, m):
    return torch.tensor(list(itertools.product(range(k), repeat=m)))


def test_the_code_prior_is_normalised_and_its_samples_follow_it():
    torch.manual_seed(0)
    prior = CodePrior(codebook_size=3, latents=2, hidden=8)
    codes = _all_codes(3, 2)
    with torch.no_grad():
        log_p = prior.log_prob(codes)
    assert float(torch.logsumexp(log_p, 0)) == pytest.approx(0.0, abs=1e-5)
    draws = prior.sample(20000)
    freq = torch.bincount(draws[:, 0] * 3 + draws[:, 1], minlength=9) / 20000.0
    assert torch.allclose(freq, log_p.exp(), atol=0.02)


def test_bounds_are_below_log_px_by_enumeration(tiny):
    torch.manual_seed(1)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    tiny.eval()
    codes = _all_codes(3, 2)  # every z: log p(x) = logsumexp_c log p(x | c) + log p(c)
    with torch.no_grad():
        log_lik = torch.stack([tiny.decode(c.expand(5, 2)).log_prob(x) for c in codes])  # (9, 5)
    uniform = torch.logsumexp(log_lik, 0) - math.log(9)
    bound = tiny.bound(x)
    assert bool((bound <= uniform + 1e-5).all())
    chosen = tiny.codes(x)
    by_hand = tiny.decode(chosen).log_prob(x) - 2 * math.log(3)
    assert torch.allclose(bound, by_hand)
    prior = CodePrior(3, 2, hidden=8)
    with torch.no_grad():
        learned = torch.logsumexp(log_lik + prior.log_prob(codes).unsqueeze(1), 0)
        assert bool((tiny.bound(x, prior) <= learned + 1e-5).all())


def test_perplexity_of_code_usage():
    assert codebook_perplexity(torch.arange(8).repeat(5), 8) == pytest.approx((8.0, 8))
    assert codebook_perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx((1.0, 1))
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, exp(H) = 2^1.5
    perplexity, used = codebook_perplexity(torch.tensor([0, 0, 1, 2]), 5)
    assert perplexity == pytest.approx(2**1.5) and used == 3


def _fit_tiny(run_dir, epochs=3):
    from amortized.data import load_dataset
    from amortized.train.fit import fit

    x = load_dataset("mnist5k").train[:300].round()
    torch.manual_seed(0)
    vq = VQVAE(784, latents=4, code_dim=4, codebook_size=16, hidden=(32,))

    def score():
        with torch.no_grad():
            codes = vq.codes(x[:100])
        return {"bound": float(vq.bound(x[:100]).mean()),
                "perplexity": codebook_perplexity(codes, 16)[0]}  # fmt: skip

    return vq, fit(vq, vq.loss, x, score, run_dir, epochs=epochs, batch_size=50)


def test_fit_trains_the_vqvae_and_resumes_exactly_after_a_kill(
    tmp_path, monkeypatch, crash_after_saves
):
    import amortized.train.fit as fit_module  # the one loop that writes every checkpoint

    vq, log = _fit_tiny(tmp_path / "whole")
    assert log[-1]["bound"] > log[0]["bound"] and log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["perplexity"] > 2  # several codes in use
    crash_after_saves(fit_module, 1)
    with pytest.raises(KeyboardInterrupt):
        _fit_tiny(tmp_path / "killed")
    monkeypatch.undo()
    resumed, log2 = _fit_tiny(tmp_path / "killed")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(log2) == drop(log)
    for (k, a), b in zip(vq.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
