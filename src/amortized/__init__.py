"""amortized: amortized variational inference, measured.

A variational family is q(z; lambda) with one parameter row lambda_i per datapoint.
Amortized inference computes lambda(x) with an encoder; classical VI optimises each
lambda_i freely (:func:`fit_local`); refinement starts from lambda(x) and takes K steps
(:func:`refine`); the gap report measures what the difference costs.
"""

from .ais import AISResult, ais, bdmc, reverse_ais
from .decoders import BernoulliMLPDecoder, GaussianMLPDecoder
from .encoders import MLPEncoder
from .estimators import elbo, iwae_bound, iwae_estimate, kl_to_prior
from .families import DiagonalGaussian, FullCovarianceGaussian, VariationalFamily
from .flows import InverseAutoregressiveFlow, PlanarFlow
from .gaps import GapReport, Quantity, difference, gap_report, merge_reports
from .iterative import IterativeEncoder
from .local import LocalFit, fit_local
from .model import LatentVariableModel
from .refine import RefinementPoint, refine, refinement_curve
from .weights import ImportanceEstimate

__version__ = "0.1.0"

__all__ = [
    "LatentVariableModel",
    "VariationalFamily",
    "DiagonalGaussian",
    "FullCovarianceGaussian",
    "PlanarFlow",
    "InverseAutoregressiveFlow",
    "MLPEncoder",
    "IterativeEncoder",
    "BernoulliMLPDecoder",
    "GaussianMLPDecoder",
    "elbo",
    "iwae_bound",
    "iwae_estimate",
    "ImportanceEstimate",
    "kl_to_prior",
    "fit_local",
    "LocalFit",
    "refine",
    "refinement_curve",
    "RefinementPoint",
    "gap_report",
    "merge_reports",
    "GapReport",
    "Quantity",
    "difference",
    "ais",
    "reverse_ais",
    "bdmc",
    "AISResult",
]
