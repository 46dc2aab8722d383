"""Tests of amortized.families: parameter layouts, shapes, densities and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from amortized.families import FAMILIES, DiagonalGaussian, FullCovarianceGaussian
from amortized.families.flows import InverseAutoregressiveFlow, PlanarFlow

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")
BOTH = [DiagonalGaussian, FullCovarianceGaussian]


def covariance(q) -> torch.Tensor:
    """Covariance matrices ``(batch, D, D)`` of a diagonal or full-covariance q."""
    if isinstance(q, MultivariateNormal):
        return q.covariance_matrix
    return torch.diag_embed(q.variance)


def random_scale_tril(batch: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Lower-triangular matrices with positive diagonals, ``(batch, d, d)``."""
    raw = torch.randn(batch, d, d, generator=generator, dtype=DTYPE)
    diag = torch.rand(batch, d, generator=generator, dtype=DTYPE) + 0.5
    return raw.tril(-1) + torch.diag_embed(diag)


@pytest.mark.parametrize(
    ("cls", "d", "expected"),
    [
        (DiagonalGaussian, 1, 2),
        (DiagonalGaussian, 3, 6),
        (FullCovarianceGaussian, 1, 2),  # mu, log L11
        (FullCovarianceGaussian, 2, 5),  # 2 + 2 + 1
        (FullCovarianceGaussian, 3, 9),  # 3 + 3 + 3
    ],
)
def test_num_params(cls, d, expected):
    assert cls(d).num_params == expected


def test_families_table_maps_names_to_classes():
    assert FAMILIES == {
        "diagonal": DiagonalGaussian,
        "fullcov": FullCovarianceGaussian,
        "planar": PlanarFlow,
        "iaf": InverseAutoregressiveFlow,
    }
    for name, cls in FAMILIES.items():
        assert cls.name == name


@pytest.mark.parametrize("cls", BOTH)
def test_distribution_shapes(cls):
    torch.manual_seed(0)
    family = cls(3)
    lam = torch.randn(4, family.num_params, dtype=DTYPE)  # (B, P)
    q = family.distribution(lam)
    assert q.batch_shape == (4,)
    assert q.event_shape == (3,)
    z = q.rsample((5,))
    assert z.shape == (5, 4, 3)  # (S, B, D)
    assert z.dtype == DTYPE
    assert q.log_prob(z).shape == (5, 4)  # (S, B)
    assert family.mean(lam).shape == (4, 3)
    torch.testing.assert_close(family.mean(lam), q.mean)


@pytest.mark.parametrize("cls", BOTH)
def test_rsample_is_differentiable_in_lam(cls):
    torch.manual_seed(0)
    family = cls(2)
    lam = torch.randn(3, family.num_params, dtype=DTYPE, requires_grad=True)
    family.distribution(lam).rsample((4,)).sum().backward()
    assert lam.grad is not None
    assert lam.grad[:, :2].abs().sum() > 0  # the means receive gradient


@pytest.mark.parametrize("cls", BOTH)
def test_prior_init_is_standard_normal(cls):
    torch.manual_seed(0)
    family = cls(3)
    lam = family.prior_init(5, dtype=DTYPE)
    assert lam.shape == (5, family.num_params)
    assert lam.dtype == DTYPE
    q = family.distribution(lam)
    torch.testing.assert_close(q.mean, torch.zeros(5, 3, dtype=DTYPE))
    torch.testing.assert_close(covariance(q), torch.eye(3, dtype=DTYPE).expand(5, 3, 3))
    z = torch.randn(7, 5, 3, dtype=DTYPE)
    expected = Normal(0.0, 1.0).log_prob(z).sum(-1)  # log N(z; 0, I), (7, 5)
    torch.testing.assert_close(q.log_prob(z), expected)


def test_diagonal_layout_is_mean_then_log_scale():
    family = DiagonalGaussian(2)
    lam = torch.tensor([[1.0, -2.0, math.log(0.5), math.log(3.0)]], dtype=DTYPE)
    q = family.distribution(lam)
    torch.testing.assert_close(q.mean, torch.tensor([[1.0, -2.0]], dtype=DTYPE))
    torch.testing.assert_close(q.stddev, torch.tensor([[0.5, 3.0]], dtype=DTYPE))


def test_diagonal_log_prob_is_sum_of_normal_log_probs():
    g = torch.Generator().manual_seed(1)
    family = DiagonalGaussian(3)
    lam = torch.randn(4, 6, generator=g, dtype=DTYPE)
    z = torch.randn(5, 4, 3, generator=g, dtype=DTYPE)
    loc, log_scale = lam[:, :3], lam[:, 3:]
    manual = Normal(loc, log_scale.exp()).log_prob(z).sum(-1)  # (5, 4)
    torch.testing.assert_close(family.distribution(lam).log_prob(z), manual)
    # and against the density written out, constants included
    var = (2 * log_scale).exp()
    written = (-0.5 * (z - loc) ** 2 / var - log_scale - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(family.distribution(lam).log_prob(z), written)


def test_fullcov_layout_is_mean_log_diagonal_then_row_major_strict_lower():
    family = FullCovarianceGaussian(3)
    lam = torch.tensor(
        [[0.1, 0.2, 0.3, math.log(2.0), math.log(3.0), math.log(4.0), 5.0, 6.0, 7.0]],
        dtype=DTYPE,
    )
    expected = torch.tensor([[[2.0, 0.0, 0.0], [5.0, 3.0, 0.0], [6.0, 7.0, 4.0]]], dtype=DTYPE)
    torch.testing.assert_close(family.scale_tril(lam), expected)
    q = family.distribution(lam)
    torch.testing.assert_close(q.scale_tril, expected)
    torch.testing.assert_close(q.mean, lam[:, :3])


def test_fullcov_params_from_round_trips():
    g = torch.Generator().manual_seed(2)
    family = FullCovarianceGaussian(3)
    loc = torch.randn(4, 3, generator=g, dtype=DTYPE)
    tril = random_scale_tril(4, 3, g)
    lam = FullCovarianceGaussian.params_from(loc, tril)
    assert lam.shape == (4, family.num_params)
    q = family.distribution(lam)
    torch.testing.assert_close(q.scale_tril, tril)
    torch.testing.assert_close(q.loc, loc)
    torch.testing.assert_close(q.covariance_matrix, tril @ tril.mT)
    # and the other way round: lam -> (loc, L) -> lam
    lam2 = torch.randn(4, family.num_params, generator=g, dtype=DTYPE)
    back = FullCovarianceGaussian.params_from(family.mean(lam2), family.scale_tril(lam2))
    torch.testing.assert_close(back, lam2)


def test_fullcov_log_prob_matches_multivariate_normal():
    g = torch.Generator().manual_seed(3)
    family = FullCovarianceGaussian(3)
    lam = torch.randn(4, family.num_params, generator=g, dtype=DTYPE)
    z = torch.randn(6, 4, 3, generator=g, dtype=DTYPE)
    tril = family.scale_tril(lam)
    reference = MultivariateNormal(lam[:, :3], covariance_matrix=tril @ tril.mT)
    torch.testing.assert_close(family.distribution(lam).log_prob(z), reference.log_prob(z))


@pytest.mark.parametrize("cls", BOTH)
def test_log_prob_gradient_matches_finite_differences(cls):
    g = torch.Generator().manual_seed(4)
    family = cls(3)
    lam = torch.randn(2, family.num_params, generator=g, dtype=DTYPE, requires_grad=True)
    z = torch.randn(3, 2, 3, generator=g, dtype=DTYPE)
    assert torch.autograd.gradcheck(lambda lam: family.distribution(lam).log_prob(z), (lam,))


@pytest.mark.parametrize("cls", BOTH)
def test_wrong_lam_shape_raises_value_error_naming_expected_shape(cls):
    family = cls(3)
    p = family.num_params
    with pytest.raises(ValueError, match=rf"\(batch, {p}\)"):
        family.distribution(torch.zeros(4, p + 1))
    with pytest.raises(ValueError, match=rf"\(batch, {p}\)"):
        family.distribution(torch.tensor(0.0))  # no parameter axis at all


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("lam", [[0.0] * 6, np.zeros((2, 6))])
def test_non_tensor_lam_raises_type_error(cls, lam):
    family = cls(3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        family.distribution(lam)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("latent_dim", [0, -1, 2.0])
def test_bad_latent_dim_raises_value_error(cls, latent_dim):
    with pytest.raises(ValueError, match="latent_dim"):
        cls(latent_dim)
