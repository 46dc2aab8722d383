"""The one resumable epoch loop: every trainer of the project runs its epochs through it.

A trainer (:class:`Epochs`) knows how to run one epoch and what it must save to carry on;
:func:`fit_epochs` does the rest, the same way for the VAE, the VQ-VAE and its code
prior: resume from the checkpoint if there is one, drop metrics lines a killed run wrote
after its last checkpoint, then epoch by epoch append the record to ``metrics.jsonl`` and
write the checkpoint atomically (:mod:`amortized.train.checkpoint`). A run killed at any point
and started again with the same call ends where an uninterrupted run ends, as long as
the trainer's state holds every random stream it draws from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError
from ..files import open_for_append, write_atomic
from ..nets.layers import adam
from .checkpoint import CheckpointError, load_checkpoint, save_atomic

log = logging.getLogger(__name__)  # shown by the command line; silent in a library
__all__ = ["Epochs", "fit", "fit_epochs", "read_metrics"]

#: The checkpoint format of :func:`fit`'s runs.
FIT_FORMAT = "amortized-fit-v1"


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
    state: dict[str, Any] | None = None,
    tensorboard: bool = False,
) -> None:
    """Run ``trainer``'s epochs in ``run_dir``, resuming from its checkpoint if present.

    ``write=False`` (every process of a distributed run but the first) reads the
    checkpoint but writes nothing. ``total`` epochs, if given, sizes the progress bar.
    ``state``: the checkpoint, where the caller has read it already (to check it before
    anything is written), so that it is not read twice. ``tensorboard``: also write every
    record's numbers to ``run_dir/tensorboard`` (a resumed run drops the events of epochs
    it redoes).
    """
    run_dir = Path(run_dir)
    checkpoint, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    if state is None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
    if state is not None:
        if state.get("format") != checkpoint_format:
            raise CheckpointError(
                f"{checkpoint} was written by another trainer ({state.get('format')})"
            )
        try:
            trainer.load(state)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint} does not match this model: {err}") from None
        if write:
            done = "finished" if trainer.done() else "resuming"
            log.info("%s: %s after epoch %d%s", run_dir, done, trainer.epoch,
                     f" of {total}" if total else "")  # fmt: skip
    if write:
        _truncate(metrics, trainer.epoch)
    scalars = _Scalars(run_dir, trainer.epoch) if write and tensorboard else None
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
        with open_for_append(metrics) as f:
            f.write((json.dumps(record) + "\n").encode())
        save_atomic({"format": checkpoint_format, **trainer.state()}, checkpoint)
        if scalars is not None:
            scalars.add(record)
    bar.close()
    if scalars is not None:
        scalars.close()


class _Scalars:
    """Every record's numbers as TensorBoard scalars, one step per epoch."""

    def __init__(self, run_dir: Path, resumed_at: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard = true needs the tensorboard package: "
                              "pip install tensorboard") from None  # fmt: skip
        # purge_step: events a killed run wrote past its checkpoint are dropped
        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=resumed_at + 1 if resumed_at else None)  # fmt: skip

    def add(self, record: dict[str, Any], prefix: str = "", step: int | None = None) -> None:
        step = int(record.get("epoch", 0)) if step is None else step
        for key, value in record.items():
            if isinstance(value, dict):  # nested numbers (the gaps over training): key/sub
                self.add(value, f"{prefix}{key}/", step)
            elif isinstance(value, int | float) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(prefix + key, value, step)
        if not prefix:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _truncate(path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` lines: a run killed after logging resumes without duplicates."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) > epochs:  # rewrite atomically: a kill here must not lose earlier lines
        write_atomic(path, "".join(lines[:epochs]))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of ``run_dir/metrics.jsonl``, oldest first ([] before any)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def fit(
    module: nn.Module,
    loss: Callable[[Tensor], Tensor],
    train_x: Tensor,
    valid_score: Callable[[], dict[str, float]],
    run_dir: str | Path,
    *,
    epochs: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[dict]:
    """Adam on ``loss(batch)`` for ``epochs`` epochs over ``train_x``; resumable.

    The epochs run through the one resumable loop, :func:`fit_epochs`:
    after every epoch ``valid_score()`` is logged to ``run_dir/metrics.jsonl`` and
    everything needed to resume (weights and buffers such as the EMA codebook, optimiser,
    random streams) is written atomically to ``run_dir/checkpoint.pt``; run the same call
    again after a kill and it carries on from the last finished epoch. Returns the log.
    Used for the VQ-VAE (its loss) and for the code prior (the codes' negative log-prior).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    epochs_run = _AdamEpochs(module, loss, train_x, valid_score, epochs, batch_size, lr, seed)
    fit_epochs(epochs_run, run_dir, checkpoint_format=FIT_FORMAT)
    module.eval()
    return list(epochs_run.log)


class _AdamEpochs:
    """Plain Adam epochs over shuffled minibatches, for :func:`amortized.train.fit.fit_epochs`."""

    def __init__(self, module, loss, train_x, valid_score, epochs, batch_size, lr, seed):
        self.module, self.loss, self.train_x, self.valid_score = module, loss, train_x, valid_score
        self.epochs, self.batch_size = epochs, batch_size
        self.optimizer = adam(module.parameters(), lr)
        self.order = torch.Generator().manual_seed(seed)
        self.epoch, self.log = 0, []

    def done(self) -> bool:
        return self.epoch >= self.epochs

    def run_epoch(self) -> dict:
        start = time.perf_counter()
        self.module.train()
        total = 0.0
        for idx in torch.randperm(self.train_x.shape[0], generator=self.order).split(
            self.batch_size
        ):
            value = self.loss(self.train_x[idx.to(self.train_x.device)])
            self.optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.optimizer.step()
            total += float(value.detach()) * len(idx)
        self.module.eval()
        self.epoch += 1
        record = {"epoch": self.epoch, "train_loss": total / self.train_x.shape[0],
                  **self.valid_score()}  # fmt: skip
        self.log.append(record | {"seconds": time.perf_counter() - start})
        return self.log[-1]

    def state(self) -> dict:
        return {"module": self.module.state_dict(), "epoch": self.epoch, "log": self.log,
                "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                "order": self.order.get_state()}  # fmt: skip

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.order.set_state(state["order"])
        self.epoch, self.log = state["epoch"], state["log"]
