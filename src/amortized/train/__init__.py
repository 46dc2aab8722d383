"""Training: build a model from its config, run the one resumable loop, load runs.

- ``loop``: validation, the model factory, schedules, the VAE's epochs and :func:`train`;
- ``fit``: the one resumable epoch loop every trainer runs through;
- ``checkpoint``: atomic, digest-checked checkpoints.
"""

from .loop import (
    CHECKPOINT_FORMAT,
    Trained,
    build,
    evaluate_elbo,
    evaluation_subset,
    kl_weight,
    learning_rate,
    load_run,
    prepare_split,
    read_metrics,
    train,
    training_bounds,
    validate,
)

__all__ = ["CHECKPOINT_FORMAT", "Trained", "build", "evaluate_elbo", "evaluation_subset",
           "kl_weight", "learning_rate", "load_run", "prepare_split", "read_metrics", "train",
           "training_bounds", "validate"]  # fmt: skip
