"""Training data larger than memory: rows of memory-mapped ``.npy`` files, read on demand.

A directory holding ``train.npy``, ``valid.npy`` and ``test.npy`` (one row per datapoint,
any numeric dtype; uint8 grey levels 0..255 are scaled to [0, 1]) loads as a
:class:`~amortized.data.Dataset` whose training split is a :class:`MappedRows`: the file
is mapped, not read, and a minibatch reads its own rows only. The held-out splits are
read into memory (they are evaluated whole, and are small next to the training split).

    amortized train --dataset path/to/directory ...

Opening the directory checks the training rows in chunks (numbers, no NaN or inf, the
value range that decides the binarization), so bad data fail before training starts,
without holding the split in memory. Rows that need dynamic binarization are binarized
per minibatch, as in memory; an evaluation view (:meth:`MappedRows.binarized`) binarizes
each row from a stream seeded by (seed, row), so any subset of rows sees the same bits.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .core import DataError, Dataset, binarization_of, check_data, image_shape_of

__all__ = ["MappedRows", "load_mapped_directory"]

#: Rows checked at a time when a directory is opened.
CHECK_ROWS = 65536


class MappedRows:
    """Rows of a memory-mapped array as float32 tensors ``(n, D)``, read when indexed.

    Supports what the training loop and the evaluation code ask of a split: ``shape``,
    ``len``, ``x[rows]`` for a tensor, array or slice of row indices (a tensor of those
    rows on ``device``), and ``to(device)``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        divide_by: float = 1.0,
        binarize_seed: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        n = self.array.shape[0]
        self.shape = torch.Size((n, math.prod(self.array.shape[1:])))
        self.divide_by, self.binarize_seed = divide_by, binarize_seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"MappedRows({str(self.path)!r}, shape={tuple(self.shape)})"

    def _like(self, **changes) -> MappedRows:
        out = object.__new__(MappedRows)
        out.__dict__.update({**self.__dict__, **changes})
        return out

    def to(self, device: torch.device | str) -> MappedRows:
        return self._like(device=torch.device(device))

    def binarized(self, seed: int) -> MappedRows:
        """A view whose row i is a fixed Bernoulli draw of its grey levels, from (seed, i)."""
        return self._like(binarize_seed=seed)

    def __getitem__(self, rows) -> Tensor:
        index = _row_indices(rows, len(self))
        x = np.asarray(self.array[index], dtype=np.float32).reshape(len(index), -1)
        if self.divide_by != 1.0:  # as in memory: uint8 grey levels / 255
            x /= self.divide_by
        if self.binarize_seed is not None:
            u = np.stack([
                np.random.default_rng([self.binarize_seed, int(i)]).random(x.shape[1])
                for i in index
            ]) if len(index) else np.empty_like(x)  # fmt: skip
            x = (u < x).astype(np.float32)
        return torch.from_numpy(x).to(self.device)


def _row_indices(rows, n: int) -> np.ndarray:
    """Row numbers in [0, n) of a slice, an integer or boolean index, or one row number."""
    if isinstance(rows, slice):
        return np.arange(*rows.indices(n))
    if isinstance(rows, Tensor):
        rows = rows.detach().cpu().numpy()
    index = np.asarray(rows)
    if index.dtype == np.bool_:
        if index.shape != (n,):
            raise IndexError(f"a boolean row mask must have shape ({n},), got {index.shape}")
        return np.flatnonzero(index)
    if index.dtype.kind not in "iu" or index.ndim > 1:
        raise IndexError(f"rows must be a slice or integers, got {index.dtype} {index.shape}")
    index = index.reshape(-1).astype(np.int64)
    if index.size and (index.min() < -n or index.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return np.where(index < 0, index + n, index)


def load_mapped_directory(path: Path) -> Dataset:
    """The dataset of a directory of ``train.npy``, ``valid.npy`` and ``test.npy``."""
    files = {split: path / f"{split}.npy" for split in ("train", "valid", "test")}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(
            f"{path}: a dataset directory needs train.npy, valid.npy and test.npy; "
            f"missing {', '.join(missing)}"
        )
    try:
        train = MappedRows(files["train"])
    except Exception as err:  # ValueError for object arrays or a bad header, OSError, ...
        raise DataError(f"cannot map {files['train']}: {err}") from err
    if train.array.dtype.kind not in "biuf":
        raise DataError(f"{files['train']}: expected numbers, got dtype {train.array.dtype}")
    if len(train) == 0 or train.array.ndim < 2:
        raise DataError(
            f"{files['train']}: expected shape (n, D...) with n >= 1, got {train.array.shape}"
        )
    held_out = {}
    for split in ("valid", "test"):
        try:
            array = np.load(files[split], allow_pickle=False)
        except Exception as err:
            raise DataError(f"cannot read {files[split]}: {err}") from err
        held_out[split] = array
    arrays = {"train": train.array, **held_out}
    shapes = {split: a.shape[1:] for split, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{path}: splits disagree on the shape of one datapoint: {shapes}")

    # uint8 grey levels 0..255 become [0, 1], as for in-memory arrays
    train_low, train_high = _range_in_chunks(train.array, files["train"])
    held = {s: check_data(a, likelihood="gaussian", name=str(files[s])).reshape(len(a), -1)
            for s, a in held_out.items()}  # fmt: skip
    highs = {"train": train_high, **{s: float(x.max()) if x.numel() else 0.0
                                     for s, x in held.items()}}  # fmt: skip
    rescale = any(arrays[s].dtype == np.uint8 and highs[s] > 1 for s in arrays)
    if rescale and train.array.dtype == np.uint8:
        train.divide_by, train_low, train_high = 255.0, train_low / 255, train_high / 255
    splits = {s: x / 255 if rescale and held_out[s].dtype == np.uint8 else x
              for s, x in held.items()}  # fmt: skip
    # the train split's range stands in for its values in the [0, 1] test; its chunks are
    # read again (lazily) only for the {0, 1} test
    train_range = torch.tensor([train_low, train_high])
    binarization = binarization_of(
        [train_range, *splits.values()], itertools.chain(splits.values(), _chunks(train))
    )
    image_shape = image_shape_of(shapes["train"], train.shape[1])
    return Dataset(path.name, train, splits["valid"], splits["test"], binarization, image_shape)


def _range_in_chunks(array: np.ndarray, source: Path) -> tuple[float, float]:
    """min and max of a mapped array, read a chunk at a time; NaN or inf raise DataError."""
    low, high = math.inf, -math.inf
    for start in range(0, array.shape[0], CHECK_ROWS):
        chunk = np.asarray(array[start : start + CHECK_ROWS], dtype=np.float32)
        rows = f"{source} rows {start}..{start + len(chunk) - 1}"
        x = check_data(chunk.reshape(len(chunk), -1), likelihood="gaussian", name=rows)
        low, high = min(low, float(x.min())), max(high, float(x.max()))
    return low, high


def _chunks(rows: MappedRows):
    """The (scaled) mapped rows, a chunk at a time."""
    for start in range(0, len(rows), CHECK_ROWS):
        yield rows[start : start + CHECK_ROWS]
