"""Training: build a model from its config, run the one resumable loop, load runs.

- ``factory``: every setting's checks, and the model, encoder and family a config describes;
- ``schedules``: the KL weight's warm-up and the learning rate per epoch;
- ``loop``: the VAE's epochs (minibatch steps on the route's bounds) and :func:`train`;
- ``fit``: the one resumable epoch loop every trainer runs through, and plain Adam epochs;
- ``run``: a finished run, loaded back;
- ``checkpoint``: atomic, digest-checked checkpoints.
"""

from ..data.splits import evaluation_subset, prepare_split
from .factory import build, validate
from .fit import read_metrics
from .loop import CHECKPOINT_FORMAT, TrainingDiverged, evaluate_elbo, train, training_bounds
from .run import Trained, load_run
from .schedules import kl_weight, learning_rate

__all__ = ["CHECKPOINT_FORMAT", "Trained", "TrainingDiverged", "build", "evaluate_elbo",
           "evaluation_subset", "kl_weight", "learning_rate", "load_run", "prepare_split",
           "read_metrics", "train", "training_bounds", "validate"]  # fmt: skip
