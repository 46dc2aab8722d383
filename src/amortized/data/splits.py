"""Evaluation splits: fixed binarizations and fixed random subsets, the same in every run."""

from __future__ import annotations

import torch
from torch import Tensor

from .core import DataError, Dataset, check_data, fixed_binarization
from .mapped import MappedRows

__all__ = ["prepare_split", "evaluation_subset"]


def prepare_split(dataset: Dataset, split: str, likelihood: str, seed: int = 0) -> Tensor:
    """An evaluation split ready for the likelihood: fixed binarization where needed."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    x = getattr(dataset, split)
    if isinstance(x, MappedRows):  # checked chunk by chunk when the directory was opened
        if likelihood == "bernoulli" and dataset.binarization == "none":
            raise DataError(
                f"{dataset.name}/{split}: values outside [0, 1]; a Bernoulli likelihood needs "
                "binary data or grey levels in [0, 1]"
            )
        if likelihood == "bernoulli" and dataset.binarization == "dynamic":
            return x.binarized(seed=1000 * seed)
        return x
    if likelihood == "bernoulli" and dataset.binarization == "dynamic":
        offset = {"train": 0, "valid": 1, "test": 2}[split]
        x = fixed_binarization(x, seed=1000 * seed + offset)
    return check_data(x, likelihood=likelihood, name=f"{dataset.name}/{split}")


def evaluation_subset(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """A fixed random subset of n rows (all rows if n is 0 or >= len(x)), in data order.

    Not the first n rows: splits can be sorted (binarized MNIST's test split is ordered
    by digit), and the first rows would then be a biased sample.
    """
    if n <= 0 or n >= x.shape[0]:
        return x
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=g)[:n].sort().values
    return x[rows]
