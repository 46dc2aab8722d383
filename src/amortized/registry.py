"""Name -> class tables used by configs and the command line."""

from __future__ import annotations

from .families import DiagonalGaussian, FullCovarianceGaussian, VariationalFamily
from .flows import InverseAutoregressiveFlow, PlanarFlow

__all__ = ["FAMILIES"]

#: Variational families by name; each is built as ``FAMILIES[name](latent_dim)``.
FAMILIES: dict[str, type[VariationalFamily]] = {
    DiagonalGaussian.name: DiagonalGaussian,
    FullCovarianceGaussian.name: FullCovarianceGaussian,
    PlanarFlow.name: PlanarFlow,
    InverseAutoregressiveFlow.name: InverseAutoregressiveFlow,
}
