"""MNIST and Fashion-MNIST from their original idx files: checked, parsed, binarized as the
papers did, and refused in one line when damaged or missing."""

from __future__ import annotations

import gzip
import io
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from amortized.data import DataError, download_idx, load_dataset
from amortized.data.idx import parse_images

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"the shared idx files are not at {SHARED}"
)


@needs_shared
@pytest.mark.parametrize(
    ("name", "binarization", "train_mean"),
    [("mnist", "dynamic", 0.1310), ("fashion-mnist-dynamic", "dynamic", 0.2855),
     ("fashion-mnist", "static", 0.3139)],
)  # fmt: skip
def test_the_splits_are_the_papers_and_fixed(name, binarization, train_mean):
    data = load_dataset(name, SHARED)
    assert (len(data.train), len(data.valid), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.data_dim == 784 and data.image_shape == (28, 28)
    assert data.binarization == binarization
    assert float(data.train.mean()) == pytest.approx(train_mean, abs=5e-4)
    assert 0 <= float(data.train.min()) and float(data.train.max()) == 1.0
    if binarization == "static":
        assert bool(((data.train == 0) | (data.train == 1)).all())


@needs_shared
def test_fashion_mnist_is_its_grey_levels_thresholded_at_a_half():
    grey = load_dataset("fashion-mnist-dynamic", SHARED)
    binary = load_dataset("fashion-mnist", SHARED)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(binary, split), (getattr(grey, split) > 0.5).float())


@needs_shared
def test_mnist_test_images_are_those_of_binarized_mnist_s_test_split():
    """binarized-mnist's test split is MNIST's test set sorted by digit: every 1 of a
    binarized image lies on a non-zero grey pixel of some MNIST test image, which we check
    for the first 50 rows against the best-matching MNIST image."""
    if not (SHARED / "binarized_mnist.npz").is_file():
        pytest.skip("binarized_mnist.npz is not in the shared data")
    grey = load_dataset("mnist", SHARED).test
    binary = load_dataset("binarized-mnist", SHARED).test[:50]
    on_zero = (binary @ (grey == 0).float().T)  # (50, 10000): 1s on black pixels
    assert bool((on_zero.min(dim=1).values == 0).all())


@needs_shared
def test_a_damaged_file_is_refused_naming_it(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(SHARED / "mnist", folder)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: its sha256 is not the "):
        load_dataset("mnist", tmp_path)


def _idx(n: int, h: int = 28, w: int = 28, magic: int = 0x803) -> bytes:
    header = b"".join(v.to_bytes(4, "big") for v in (magic, n, h, w))
    return gzip.compress(header + bytes(n * h * w))


def test_idx_bytes_are_parsed_and_malformed_ones_refused():
    x = parse_images(_idx(3), "ok.gz", 3)
    assert x.shape == (3, 784) and x.dtype == torch.float32
    for raw, message in [(b"plain", "not a gzip file"), (_idx(3, magic=0x801), "not an idx3"),
                         (_idx(2), "expected 3 images of 28 x 28"),
                         (_idx(3, 14, 14), "found 3 of 14 x 14")]:  # fmt: skip
        with pytest.raises(DataError, match=message):
            parse_images(raw, "bad.gz", 3)


def test_missing_files_say_where_they_were_looked_for_and_how_to_get_them(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "fashion_mnist") in message
    assert "amortized download fashion-mnist" in message and "\n" not in message


def test_a_download_is_checked_and_offline_machines_are_told(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="seems offline; copy the four idx files of mnist"):
        download_idx("mnist", tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"forged"))
    with pytest.raises(DataError, match="differs from the published"):
        download_idx("mnist", tmp_path)
    assert not [p for p in (tmp_path / "mnist").iterdir()]  # nothing left that looks complete
