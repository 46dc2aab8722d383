"""Inference: how the rows of lambda are computed.

- ``optimiser``: the one per-datapoint optimiser of lambda (Adam steps in the scale of q);
- ``local``: classical VI, every row optimised freely (:func:`fit_local`);
- ``refine``: K steps from an encoder's output, for SA-VAE and test-time refinement;
- ``iterative``: a learned update of lambda (Marino et al. 2018);
- ``routes``: the inference routes as objects, which training and evaluation ask.
"""

from .iterative import IterativeEncoder
from .local import LocalFit, fit_local
from .refine import RefinementPoint, refine, refinement_curve, refinement_path
from .routes import ROUTES, Route, register_route, route_for

__all__ = ["IterativeEncoder", "LocalFit", "fit_local", "RefinementPoint", "refine",
           "refinement_curve", "refinement_path", "ROUTES", "Route", "register_route",
           "route_for"]  # fmt: skip
