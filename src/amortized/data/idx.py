r"""MNIST and Fashion-MNIST from their original idx files, checked by their checksums.

The four gzipped idx files of each (LeCun et al. 1998; Xiao, Rasul & Vollgraf 2017) are read
from ``data_dir/mnist/`` or ``data_dir/fashion_mnist/`` (or ``data_dir`` itself), each
checked against the sha256 of the file its authors distribute before it is parsed.
:func:`download_idx` fetches them where the machine is online.

The splits are fixed: the first 50,000 of the 60,000 training images train, the last
10,000 validate, and the 10,000 test images test. How a Bernoulli model sees them:

- ``mnist``: grey levels in [0, 1], binarized afresh at every training step and once,
  fixed, for evaluation (``binarization="dynamic"``), the protocol of Burda et al. (2016)
  for their IWAE table;
- ``fashion-mnist``: thresholded at 0.5 once (``binarization="static"``), as Cremer, Li &
  Duvenaud (2018) binarize it;
- ``fashion-mnist-dynamic``: grey levels, binarized dynamically like ``mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .core import DataError, Dataset

__all__ = ["IDX_DATASETS", "download_idx", "load_idx_dataset", "parse_images"]

#: 50,000 / 10,000 of the training file, then the test file.
TRAIN_ROWS = 50_000


@dataclass(frozen=True)
class _Source:
    """Where one dataset's four files live and what they must hash to."""

    folder: str
    url: str
    sha256: dict[str, str]  # file name -> sha256 of the .gz


_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
          "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
_MNIST = _Source(
    "mnist",
    "https://ossci-datasets.s3.amazonaws.com/mnist/{file}",
    dict(zip(_FILES, (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ), strict=True)),
)  # fmt: skip
_FASHION = _Source(
    "fashion_mnist",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{file}",
    dict(zip(_FILES, (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ), strict=True)),
)  # fmt: skip

#: name -> (its files, how a Bernoulli model sees it)
IDX_DATASETS: dict[str, tuple[_Source, str]] = {
    "mnist": (_MNIST, "dynamic"),
    "fashion-mnist": (_FASHION, "threshold"),
    "fashion-mnist-dynamic": (_FASHION, "dynamic"),
}


def load_idx_dataset(name: str, root: Path, *, download: bool = False) -> Dataset:
    """The dataset ``name`` of :data:`IDX_DATASETS` from the idx files under ``root``."""
    source, binarization = IDX_DATASETS[name]
    if download and _find(source, root) is None:
        download_idx(name, root)
    folder = _find(source, root)
    if folder is None:
        raise DataError(_missing_message(name, source, root))
    train = _images(folder / _FILES[0], 60_000, source.sha256[_FILES[0]])
    test = _images(folder / _FILES[2], 10_000, source.sha256[_FILES[2]])
    if binarization == "threshold":
        train, test = (train > 0.5).to(torch.float32), (test > 0.5).to(torch.float32)
    return Dataset(
        name=name,
        train=train[:TRAIN_ROWS],
        valid=train[TRAIN_ROWS:],
        test=test,
        binarization="static" if binarization == "threshold" else "dynamic",
        image_shape=(28, 28),
    )


def _find(source: _Source, root: Path) -> Path | None:
    """The folder holding the two image files: ``root/<folder>`` or ``root`` itself."""
    for folder in (root / source.folder, root / source.folder.replace("_", "-"), root):
        if all((folder / f).is_file() for f in (_FILES[0], _FILES[2])):
            return folder
    return None


def _missing_message(name: str, source: _Source, root: Path) -> str:
    where = f"{root}" if root.is_dir() else f"{root} (directory does not exist)"
    return (
        f"{name} not found in {where}: expected {_FILES[0]} and {_FILES[2]} in "
        f"{root / source.folder} (or in {root}); when online run `amortized download {name} "
        f"--data-dir {root}`, or copy the files there by hand "
        f"(../shared/data/{source.folder}/ holds them)"
    )


def _images(path: Path, rows: int, sha256: str | None) -> torch.Tensor:
    """The grey levels of one gzipped idx3 image file, checked against ``sha256`` (the
    published file's; None: unchecked), as ``(rows, 784)`` float32 in [0, 1]."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return parse_images(raw, str(path), rows, sha256)


def parse_images(raw: bytes, source: str, rows: int, sha256: str | None = None) -> torch.Tensor:
    """Parse the bytes of a gzipped idx3 image file (``source`` names it in errors)."""
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(
            f"{source}: its sha256 is not the published file's ({sha256[:12]}...): it is "
            "damaged, or another file under the same name; download it again"
        )
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"{source}: not a gzip file ({err})") from None
    if len(data) < 16 or int.from_bytes(data[:4], "big") != 0x00000803:
        raise DataError(f"{source}: not an idx3 image file (magic {data[:4].hex()})")
    n, height, width = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    if (n, height, width) != (rows, 28, 28) or len(data) != 16 + n * height * width:
        raise DataError(
            f"{source}: expected {rows} images of 28 x 28 ({16 + rows * 784} bytes), "
            f"found {n} of {height} x {width} in {len(data)} bytes"
        )
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, height * width)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def download_idx(name: str, data_dir: str | Path) -> Path:
    """Download the four idx files of ``name`` into ``data_dir/<folder>``, each checked by
    its sha256 before it is renamed into place (files already there and right are kept)."""
    from .mnist import _download_checked, _sha256_of_file

    source, _ = IDX_DATASETS[name]
    folder = Path(data_dir).expanduser() / source.folder
    folder.mkdir(parents=True, exist_ok=True)
    for file, sha in source.sha256.items():
        target = folder / file
        if target.is_file() and _sha256_of_file(target) == sha:
            continue
        _download_checked(source.url.format(file=file), target, sha,
                          by_hand=f"copy the four idx files of {name} into {folder}")  # fmt: skip
    return folder
