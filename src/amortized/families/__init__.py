"""Variational families q(z; lambda), one parameter row lambda per datapoint.

- ``base``: :class:`VariationalFamily`, the lambda contract every family keeps;
- ``gaussian``: the diagonal and full-covariance Gaussians;
- ``flows``: planar flows and inverse autoregressive flows on a diagonal Gaussian.

``FAMILIES`` names them for configs and the command line.
"""

from __future__ import annotations

from .base import MEAN_STEP, VariationalFamily, gaussian_step_scale
from .flows import InverseAutoregressiveFlow, PlanarFlow
from .gaussian import DiagonalGaussian, FullCovarianceGaussian

__all__ = [
    "FAMILIES",
    "MEAN_STEP",
    "VariationalFamily",
    "DiagonalGaussian",
    "FullCovarianceGaussian",
    "PlanarFlow",
    "InverseAutoregressiveFlow",
    "gaussian_step_scale",
]

#: Variational families by name; each is built as ``FAMILIES[name](latent_dim)``.
FAMILIES: dict[str, type[VariationalFamily]] = {
    DiagonalGaussian.name: DiagonalGaussian,
    FullCovarianceGaussian.name: FullCovarianceGaussian,
    PlanarFlow.name: PlanarFlow,
    InverseAutoregressiveFlow.name: InverseAutoregressiveFlow,
}
