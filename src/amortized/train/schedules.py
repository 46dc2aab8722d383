"""The schedules of training: the KL weight's warm-up and the learning rate per epoch."""

from __future__ import annotations

import math

from ..config import TrainConfig

__all__ = ["kl_weight", "learning_rate"]


def kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The KL weight beta at (1-based) training ``step``: from 0 to 1 over the warm-up.

    ``linear`` is Bowman et al.'s (2016) ramp; ``sigmoid`` is the logistic curve centred
    half way through the warm-up, 1 / (1 + exp(-10 (t - 1/2))) at fraction t of it.

    Example:
        >>> c = TrainConfig(warmup_epochs=1.0, kl_schedule="sigmoid")
        >>> [round(kl_weight(c, s, 100), 3) for s in (1, 50, 99, 100)]
        [0.007, 0.5, 0.993, 1.0]
    """
    warm = config.warmup_epochs * steps_per_epoch
    if warm <= 0 or step >= warm:
        return 1.0
    t = step / warm
    if config.kl_schedule == "linear":
        return t
    return 1.0 / (1.0 + math.exp(-10.0 * (t - 0.5)))


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch`` under ``config.lr_schedule``.

    ``burda`` is the schedule of Burda, Grosse & Salakhutdinov (2016): stage i lasts 3^i
    epochs at ``lr * 10^(-i/7)``; stages 0..7 make their 3280 epochs. ``cosine`` falls from
    ``lr`` at the first epoch along half a cosine, towards 0 after the last.

    Example:
        >>> c = TrainConfig(lr_schedule="burda")
        >>> [round(learning_rate(c, e) / c.lr, 3) for e in (0, 1, 3, 4, 12, 13)]
        [1.0, 0.72, 0.72, 0.518, 0.518, 0.373]
        >>> c = TrainConfig(lr_schedule="cosine", epochs=4)
        >>> [round(learning_rate(c, e) / c.lr, 3) for e in range(4)]
        [1.0, 0.854, 0.5, 0.146]
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "cosine":
        return config.lr * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return config.lr * 10 ** (-stage / 7)
