"""The one resumable epoch loop: every trainer of the project runs its epochs through it.

A trainer (:class:`Epochs`) knows how to run one epoch and what it must save to carry on;
:func:`fit_epochs` does the rest, the same way for the VAE, the VQ-VAE and its code
prior: resume from the checkpoint if there is one, drop metrics lines a killed run wrote
after its last checkpoint, then epoch by epoch append the record to ``metrics.jsonl`` and
write the checkpoint atomically (:mod:`amortized.checkpoint`). A run killed at any point
and started again with the same call ends where an uninterrupted run ends, as long as
the trainer's state holds every random stream it draws from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_atomic

__all__ = ["Epochs", "fit_epochs", "read_metrics"]


class Epochs(Protocol):
    """What :func:`fit_epochs` asks of a trainer."""

    epoch: int  # epochs finished so far

    def done(self) -> bool:
        """Whether training should stop (epoch budget spent, or early stopping)."""

    def run_epoch(self) -> dict[str, Any] | None:
        """Run one epoch; its metrics record, or None where this process writes nothing."""

    def state(self) -> dict[str, Any]:
        """Everything needed to resume after this epoch: weights, optimiser, random streams."""

    def load(self, state: dict[str, Any]) -> None:
        """Resume from what :meth:`state` returned (raise CheckpointError if it does not fit)."""


def fit_epochs(
    trainer: Epochs,
    run_dir: str | Path,
    *,
    checkpoint_format: str,
    write: bool = True,
    progress: bool = False,
    total: int | None = None,
) -> None:
    """Run ``trainer``'s epochs in ``run_dir``, resuming from its checkpoint if present.

    ``write=False`` (every process of a distributed run but the first) reads the
    checkpoint but writes nothing. ``total`` epochs, if given, sizes the progress bar.
    """
    run_dir = Path(run_dir)
    checkpoint, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if state.get("format") != checkpoint_format:
            raise CheckpointError(
                f"{checkpoint} was written by another trainer ({state.get('format')})"
            )
        try:
            trainer.load(state)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint} does not match this model: {err}") from None
    if write:
        _truncate(metrics, trainer.epoch)
    bar = tqdm(total=total, initial=trainer.epoch, desc="train", leave=False,
               disable=not progress)  # fmt: skip
    while not trainer.done():
        record = trainer.run_epoch()
        bar.update(1)
        if record is not None:
            bar.set_postfix({k: f"{v:.2f}" for k, v in record.items()
                             if k in ("valid_elbo", "best_valid_elbo")})  # fmt: skip
        if not write:
            continue
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        save_atomic({"format": checkpoint_format, **trainer.state()}, checkpoint)
    bar.close()


def _truncate(path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` lines: a run killed after logging resumes without duplicates."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) > epochs:  # rewrite atomically: a kill here must not lose earlier lines
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(lines[:epochs]))
        os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of ``run_dir/metrics.jsonl``, oldest first ([] before any)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
