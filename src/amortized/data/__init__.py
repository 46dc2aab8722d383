"""Data: the dataset type and its checks, the built-in datasets, users' arrays.

- ``core``: :class:`Dataset`, :class:`DataError`, :func:`check_data`, binarization, and
  the loaders of the built-in datasets and of users' ``.npy``/``.npz`` files;
- ``mapped``: training splits larger than memory, memory-mapped from ``.npy`` files.
"""

from .core import (
    BINARIZED_MNIST_SHA256,
    BINARIZED_MNIST_URL,
    DATASETS,
    DataError,
    Dataset,
    binarization_of,
    binarize,
    check_data,
    default_data_dir,
    download_binarized_mnist,
    fixed_binarization,
    image_shape_of,
    load_dataset,
)
from .mapped import MappedRows, load_mapped_directory

__all__ = ["BINARIZED_MNIST_SHA256", "BINARIZED_MNIST_URL", "DATASETS", "DataError", "Dataset",
           "MappedRows", "binarization_of", "binarize", "check_data", "default_data_dir",
           "download_binarized_mnist", "fixed_binarization", "image_shape_of", "load_dataset",
           "load_mapped_directory"]  # fmt: skip
