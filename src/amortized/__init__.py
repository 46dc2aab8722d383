"""amortized: amortized variational inference, measured.

A variational family is q(z; lambda) with one parameter row lambda_i per datapoint.
Amortized inference computes lambda(x) with an encoder; classical VI optimises each
lambda_i freely (:func:`fit_local`); refinement starts from lambda(x) and takes K steps
(:func:`refine`); the gap report measures what the difference costs.
"""

from .estimators import elbo, iwae_bound, iwae_estimate, kl_to_prior
from .families import DiagonalGaussian, FullCovarianceGaussian, VariationalFamily
from .families.flows import InverseAutoregressiveFlow, PlanarFlow
from .inference.iterative import IterativeEncoder
from .inference.local import LocalFit, fit_local
from .inference.refine import RefinementPoint, refine, refinement_curve
from .measure.ais import AISResult, ais, bdmc, reverse_ais
from .measure.gaps import gap_report
from .measure.report import GapReport, PerDatapoint, Quantity, Rows, difference, merge_reports
from .model import LatentVariableModel
from .nets.decoders import BernoulliMLPDecoder, GaussianMLPDecoder
from .nets.encoders import MLPEncoder
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
    "PerDatapoint",
    "Quantity",
    "Rows",
    "difference",
    "ais",
    "reverse_ais",
    "bdmc",
    "AISResult",
]
