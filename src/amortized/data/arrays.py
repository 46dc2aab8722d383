"""A user's own ``.npy``/``.npz`` arrays as a :class:`~amortized.data.core.Dataset`."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..memory import free_memory, gib
from .core import DataError, Dataset, _split_indices, binarization_of, check_data, image_shape_of

__all__ = ["load_user_arrays", "stored_arrays"]

#: Bytes in memory per stored byte and per element while loading: the stored array, and
#: its float32 copy.
FLOAT32_BYTES = 4


def stored_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of every array in a ``.npy`` or ``.npz`` file, from their
    headers alone: nothing is decompressed or loaded. ``{}`` where a header cannot be
    read (the load itself then names the problem)."""
    def header(f) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)  # fmt: skip
        shape, _, dtype = read(f)
        return tuple(shape), dtype

    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as f:
                return {"data": header(f)}
        with zipfile.ZipFile(path) as archive:
            found = {}
            for name in archive.namelist():
                if name.endswith(".npy"):
                    with archive.open(name) as f:
                        found[name[: -len(".npy")]] = header(f)
            return found
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return {}


def _check_expanded_size(path: Path) -> None:
    """Refuse, before anything is decompressed, arrays that would not fit in memory."""
    arrays = stored_arrays(path)
    sizes = {key: math.prod(shape) * (dtype.itemsize + FLOAT32_BYTES)
             for key, (shape, dtype) in arrays.items()}  # fmt: skip
    need, free = sum(sizes.values()), free_memory("cpu")
    if free is not None and need > free:
        largest = max(sizes, key=sizes.get)
        raise DataError(
            f"{path}: its arrays would take {gib(need)} of memory once loaded ({largest}: "
            f"shape {arrays[largest][0]}, {arrays[largest][1]}), more than the {gib(free)} "
            "free; use a smaller file, or a directory of .npy splits, which are memory-mapped"
        )


def load_user_arrays(path: Path) -> Dataset:
    """Load ``.npy``/``.npz`` arrays as a :class:`Dataset` (see :func:`load_dataset`)."""
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    _check_expanded_size(path)
    try:
        if path.suffix.lower() == ".npy":
            arrays = {"data": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # ValueError for object arrays, BadZipFile, OSError, ...
        raise DataError(
            f"cannot read {path}: {err} (arrays are loaded with allow_pickle=False; "
            "save plain numeric arrays)"
        ) from err
    for key, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise DataError(f"{path}[{key}]: expected numbers, got dtype {array.dtype}")

    # uint8 grey levels 0..255 become [0, 1]; uint8 data already in {0, 1} stay as they are.
    scale = any(a.dtype == np.uint8 and a.size and a.max() > 1 for a in arrays.values())

    def tensor(key: str) -> torch.Tensor:
        """Checked float32 tensor of one stored array, flattened to (n, D)."""
        array = arrays[key]
        label = str(path) if path.suffix.lower() == ".npy" else f"{path}[{key}]"
        x = check_data(array, likelihood="gaussian", name=label)
        if scale and array.dtype == np.uint8:
            x = x / 255.0
        return x.reshape(x.shape[0], -1)

    if "train" in arrays:
        if "test" not in arrays:
            raise DataError(
                f"{path}: has 'train' but no 'test' array (found {sorted(arrays)}); save train "
                "and test (valid optional), or a single array to be split 80/10/10"
            )
        keys = ["train", "valid", "test"] if "valid" in arrays else ["train", "test"]
        event_shapes = {key: arrays[key].shape[1:] for key in keys}
        if len(set(event_shapes.values())) != 1:
            raise DataError(
                f"{path}: arrays disagree on the shape of one datapoint: {event_shapes}"
            )
        event_shape = event_shapes["train"]
        train, test = tensor("train"), tensor("test")
        if "valid" in arrays:
            valid = tensor("valid")
        else:  # carve the last 10% of train, deterministically
            if len(train) < 2:
                raise DataError(
                    f"{path}[train]: {len(train)} row(s) is too few to carve a valid split"
                )
            n_valid = max(1, len(train) // 10)
            train, valid = train[:-n_valid], train[-n_valid:]
    elif len(arrays) == 1:
        (key,) = arrays
        event_shape = arrays[key].shape[1:]
        x = tensor(key)
        if len(x) < 3:
            raise DataError(f"{path}[{key}]: {len(x)} row(s) is too few to split train/valid/test")
        n_held_out = max(1, len(x) // 10)
        train_idx, valid_idx, test_idx = _split_indices(len(x), n_held_out, n_held_out)
        train, valid, test = x[train_idx], x[valid_idx], x[test_idx]
    else:
        raise DataError(
            f"{path}: expected arrays 'train' and 'test' (and optionally 'valid'), or a single "
            f"array, found {sorted(arrays)}"
        )

    splits = (train, valid, test)
    binarization = binarization_of(splits, splits)
    image_shape = image_shape_of(event_shape, train.shape[1])
    return Dataset(
        name=path.name,
        train=train,
        valid=valid,
        test=test,
        binarization=binarization,
        image_shape=image_shape,
    )
