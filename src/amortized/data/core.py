r"""The dataset type and its checks: every bad-data problem becomes one line.

A :class:`Dataset` is three fixed splits, each a ``(n, D)`` float32 tensor. Data that
enter a model from anywhere go through :func:`check_data`, which turns every bad-data
problem into a one-line :class:`DataError`; :func:`binarize` and
:func:`fixed_binarization` make binary data of grey levels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "check_data", "binarization_of", "image_shape_of", "binarize",
           "fixed_binarization"]  # fmt: skip

_SPLITS = ("train", "valid", "test")
_BINARIZATIONS = ("dynamic", "static", "none")
_LIKELIHOODS = ("bernoulli", "gaussian")

# Seed of every split permutation in this file. A constant on purpose: the same rows must be
# "the test set" for every user and every run. np.random.RandomState is used because NumPy
# promises its stream never changes (NEP 19), unlike Generator's or torch's.
_SPLIT_SEED = 20110411

_MNIST_PIXELS = 28 * 28  # images of this many values are read as 28 x 28


class DataError(ValueError):
    """Bad or missing data. The message is one line naming the problem and the file or array."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Three fixed splits of one dataset, each a ``(n, D)`` float32 tensor.

    Arguments:
        name: The dataset's name (or the file name of a user's arrays).
        train: ``(n_train, D)`` float32.
        valid: ``(n_valid, D)`` float32.
        test: ``(n_test, D)`` float32.
        binarization: How Bernoulli models should see the data: ``"dynamic"`` (grey levels
            in [0, 1]; draw a fresh :func:`binarize` each pass, and evaluate on
            :func:`fixed_binarization`), ``"static"`` (already in {0, 1}) or ``"none"``
            (real-valued data, for Gaussian likelihoods).
        image_shape: ``(28, 28)`` for MNIST-like data, so rows can be shown as images with
            ``x.reshape(-1, *image_shape)``; ``None`` if unknown.

    Equality is identity (comparing tensors elementwise is rarely what ``==`` should mean).
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    binarization: str
    image_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.binarization not in _BINARIZATIONS:
            raise ValueError(
                f"binarization must be one of {_BINARIZATIONS}, got {self.binarization!r}"
            )
        dims = {split: tuple(getattr(self, split).shape) for split in _SPLITS}
        for split, shape in dims.items():
            if len(shape) != 2:
                raise DataError(f"{self.name}: {split} must have shape (n, D), got {shape}")
        if len({shape[1] for shape in dims.values()}) != 1:
            raise DataError(f"{self.name}: splits disagree on the data dimension: {dims}")

    @property
    def data_dim(self) -> int:
        """D, the length of one flattened datapoint."""
        return int(self.train.shape[1])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{split}={tuple(getattr(self, split).shape)}" for split in _SPLITS)
        return (
            f"Dataset(name={self.name!r}, {shapes}, binarization={self.binarization!r}, "
            f"image_shape={self.image_shape})"
        )


def _split_indices(
    n: int, n_valid: int, n_test: int, seed: int = _SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train/valid/test row indices covering ``range(n)``, from a fixed permutation.

    Indices stay in permuted order, so the first rows of a split are a random subset of it.
    """
    perm = np.random.RandomState(seed).permutation(n)
    n_train = n - n_valid - n_test
    return perm[:n_train], perm[n_train : n_train + n_valid], perm[n_train + n_valid :]


def check_data(x: object, *, likelihood: str = "bernoulli", name: str = "data") -> torch.Tensor:
    """Check data before a model sees it; return it as a float32 tensor.

    Every problem raises a one-line :class:`DataError` naming ``name``, so bad data fail where
    they enter rather than as a NaN loss hundreds of steps later.

    Arguments:
        x: A ``torch.Tensor`` or ``numpy.ndarray`` of shape ``(n, D...)``.
        likelihood: ``"bernoulli"`` needs binary values in {0, 1}; ``"gaussian"`` only needs
            finite values.
        name: What to call the data in error messages (a file name, ``"train"``, ...).

    Raises:
        DataError: not an array, fewer than 2 dims, empty, non-numeric, NaN or inf, or (for
            ``"bernoulli"``) values outside {0, 1}.
        ValueError: unknown ``likelihood``.

    Example:
        >>> check_data(torch.tensor([[0, 1], [1, 1]])).dtype
        torch.float32
    """
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise DataError(f"{name}: expected numbers, got numpy dtype {x.dtype}")
        if x.dtype != np.float32 or not x.flags.writeable:
            x = x.astype(np.float32)  # a writeable copy; torch warns on read-only arrays
        t = torch.from_numpy(x)
    elif isinstance(x, torch.Tensor):
        if x.is_complex() or not (x.is_floating_point() or x.dtype == torch.bool or _is_int(x)):
            raise DataError(f"{name}: expected real numbers, got dtype {x.dtype}")
        t = x.to(torch.float32)
    else:
        raise DataError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.dim() < 2:
        raise DataError(
            f"{name}: expected shape (n, D...) with one row per datapoint, got {tuple(t.shape)}"
        )
    if t.numel() == 0:
        raise DataError(f"{name} is empty: shape {tuple(t.shape)}")
    # One pass decides that the data are fine; the passes below only explain what is not.
    if likelihood == "bernoulli":
        if bool(((t == 0) | (t == 1)).all()):
            return t
    elif bool(torch.isfinite(t).all()):
        return t
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    if n_nan or n_inf:
        raise DataError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values (of {t.numel()}, "
            "after conversion to float32)"
        )
    if likelihood == "bernoulli":
        low, high = float(t.min()), float(t.max())
        if low < 0 or high > 1:
            raise DataError(
                f"{name}: values must lie in [0, 1] for a Bernoulli likelihood, "
                f"found min {low:.4g} and max {high:.4g}"
            )
        n_grey = int(((t != 0) & (t != 1)).sum())
        if n_grey:
            raise DataError(
                f"{name}: {n_grey} of {t.numel()} values lie strictly between 0 and 1; "
                "Bernoulli likelihood needs binary data; binarize grey levels first "
                "(amortized.data.binarize)"
            )
    return t


def binarization_of(in_unit_parts: Iterable[torch.Tensor], binary_parts: Iterable[torch.Tensor]
                    ) -> str:  # fmt: skip
    """How Bernoulli models should see data, from its parts (splits, or chunks of one):
    ``"static"`` if every value is 0 or 1, ``"dynamic"`` if all lie in [0, 1], else
    ``"none"``. The parts are iterated lazily, the binary ones only if all are in [0, 1].
    """
    if not all(bool((x >= 0).all() and (x <= 1).all()) for x in in_unit_parts):
        return "none"
    return "static" if all(bool(((x == 0) | (x == 1)).all()) for x in binary_parts) else "dynamic"


def image_shape_of(event_shape: tuple[int, ...], data_dim: int) -> tuple[int, ...] | None:
    """(height, width) of stored datapoints: their own 2-d shape, 28 x 28 for flat rows of
    784 values (MNIST-like), else None."""
    if len(event_shape) == 2:
        return tuple(int(d) for d in event_shape)
    return (28, 28) if data_dim == _MNIST_PIXELS else None


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Bernoulli(x) sample of grey levels ``x`` in [0, 1], as float32 {0, 1}.

    Dynamic binarization (Salakhutdinov & Murray 2008): a fresh sample each time grey-level
    data are shown to a Bernoulli model, so the model cannot memorise one noisy binarization.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> binarize(torch.tensor([[0.0, 1.0]]), generator=g)
        tensor([[0., 1.]])
    """
    x = x.to(torch.float32)
    if x.numel() and not bool((x >= 0).all() & (x <= 1).all()):  # also catches NaN
        raise DataError("binarize: probabilities must lie in [0, 1] (and not be NaN)")
    return torch.bernoulli(x, generator=generator)


def fixed_binarization(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One deterministic binarization of grey levels ``x``: the same seed gives the same bits.

    For the evaluation sets of dynamically binarized data, so that test numbers from different
    runs are measured on the same {0, 1} images. The uniforms come from NumPy's
    ``RandomState``, whose stream NumPy promises never to change (NEP 19), so the result does
    not depend on the torch version or device. They are drawn row by row, so the first k rows
    of ``fixed_binarization(x)`` equal ``fixed_binarization(x[:k])``.

    Example:
        >>> x = torch.full((2, 3), 0.5)
        >>> bool((fixed_binarization(x, seed=1) == fixed_binarization(x, seed=1)).all())
        True
    """
    probs = x.detach().to("cpu", torch.float32)
    if probs.numel() and not bool((probs >= 0).all() & (probs <= 1).all()):
        raise DataError("fixed_binarization: probabilities must lie in [0, 1] (and not be NaN)")
    uniforms = np.random.RandomState(seed).random_sample(tuple(probs.shape))  # [0, 1), C order
    bits = torch.from_numpy(uniforms < probs.numpy()).to(torch.float32)
    return bits.to(x.device)
