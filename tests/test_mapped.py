"""Memory-mapped training data: the same rows, the same run, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amortized.config import TrainConfig
from amortized.data import DataError, fixed_binarization, load_dataset
from amortized.data.mapped import MappedRows
from amortized.train import evaluation_subset, prepare_split, read_metrics, train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def grey():
    """uint8 grey levels of 420 real digits, as train/valid/test."""
    full = load_dataset("mnist5k")
    levels = (full.train[:420] * 255).round().to(torch.uint8).numpy().reshape(-1, 28, 28)
    return {"train": levels[:300], "valid": levels[300:360], "test": levels[360:]}


def _write(directory, arrays):
    directory.mkdir()
    for split, array in arrays.items():
        np.save(directory / f"{split}.npy", array)
    return directory


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run_dir)]


def test_a_directory_maps_the_training_rows_and_reads_the_same_values(grey, tmp_path):
    ds = load_dataset(str(_write(tmp_path / "d", grey)))
    assert isinstance(ds.train, MappedRows) and isinstance(ds.train.array, np.memmap)
    assert ds.train.shape == (300, 784) and ds.image_shape == (28, 28)
    assert ds.binarization == "dynamic"  # uint8 grey levels, scaled to [0, 1]
    in_memory = torch.from_numpy(grey["train"].reshape(300, -1).astype(np.float32)) / 255
    rows = torch.tensor([299, 0, 17, 17, -1])
    assert torch.equal(ds.train[rows], in_memory[rows])
    assert torch.equal(ds.train[10:20], in_memory[10:20])
    assert torch.equal(ds.valid, torch.from_numpy(grey["valid"].reshape(60, -1) / 255).float())
    with pytest.raises(IndexError, match="out of range"):
        ds.train[torch.tensor([300])]


def test_the_evaluation_view_binarizes_each_row_alike_in_any_subset(grey, tmp_path):
    ds = load_dataset(str(_write(tmp_path / "d", grey)))
    view = prepare_split(ds, "train", "bernoulli")
    whole = view[:]
    assert set(whole.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(view[torch.tensor([7, 3])], whole[[7, 3]])
    subset = evaluation_subset(view, 25)
    assert isinstance(subset, torch.Tensor) and subset.shape == (25, 784)
    # the bits follow the grey levels: darker pixels are on more often
    p = ds.train[:]
    assert float(whole[p > 0.9].mean()) > 0.85 and float(whole[p < 0.1].mean()) < 0.15
    assert not torch.equal(whole, prepare_split(ds, "train", "bernoulli", seed=1)[:])


def test_training_from_a_mapped_directory_is_the_run_from_memory(grey, tmp_path):
    binary = {s: (a > 127).astype(np.uint8) for s, a in grey.items()}  # static, {0, 1}
    directory = _write(tmp_path / "d", binary)
    np.savez(tmp_path / "same.npz", **binary)
    mapped, in_memory = load_dataset(str(directory)), load_dataset(str(tmp_path / "same.npz"))
    assert mapped.binarization == in_memory.binarization == "static"
    config = TrainConfig(latent_dim=2, hidden=(16,), epochs=2, batch_size=50, progress=False)
    a = train(config, tmp_path / "a", dataset=mapped)
    b = train(config, tmp_path / "b", dataset=in_memory)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dynamic_binarization_of_mapped_rows_trains(grey, tmp_path):
    ds = load_dataset(str(_write(tmp_path / "d", grey)))
    config = TrainConfig(latent_dim=2, hidden=(16,), epochs=2, batch_size=50, progress=False)
    train(config, tmp_path / "run", dataset=ds)
    metrics = _metrics(tmp_path / "run")
    assert metrics[-1]["valid_elbo"] > metrics[0]["valid_elbo"]
    # held-out splits are in memory and fixed-binarized as usual
    assert torch.equal(prepare_split(ds, "valid", "bernoulli"), fixed_binarization(ds.valid, 1))


def test_bad_directories_say_what_is_wrong(grey, tmp_path):
    partial = _write(tmp_path / "partial", {"train": grey["train"], "test": grey["test"]})
    with pytest.raises(DataError, match="missing valid.npy"):
        load_dataset(str(partial))
    nan = grey["train"].astype(np.float32) / 255
    nan[123, 4, 5] = np.nan
    with pytest.raises(DataError, match="rows 0..299 contains 1 NaN"):
        load_dataset(str(_write(tmp_path / "nan", {**grey, "train": nan})))
    with pytest.raises(DataError, match="disagree on the shape"):
        load_dataset(str(_write(tmp_path / "shape", {**grey, "test": grey["test"][:, :27]})))
    real = {s: a.astype(np.float32) - 100 for s, a in grey.items()}
    ds = load_dataset(str(_write(tmp_path / "real", real)))
    assert ds.binarization == "none"
    with pytest.raises(DataError, match="Bernoulli likelihood"):
        prepare_split(ds, "train", "bernoulli")
    (tmp_path / "corrupt").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "corrupt" / f"{split}.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="cannot map"):
        load_dataset(str(tmp_path / "corrupt"))
