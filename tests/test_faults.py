"""Faults a user meets: a full disk, a killed save, planted links, a GPU that is not there,
a checkpoint carrying code, networks too large for memory. Each ends in one line naming
the problem, and nothing written before is lost."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amortized.apps.cli import main
from amortized.config import ConfigError, TrainConfig
from amortized.data import DataError, load_dataset
from amortized.files import (
    lock_directory,
    open_for_append,
    remove_stale_temporaries,
    write_atomic,
)
from amortized.train import read_metrics, train
from amortized.train.checkpoint import CheckpointError, load_checkpoint
from amortized.train.factory import check_size, parse_device

QUICK = ["--latent-dim", "2", "--hidden", "16", "--batch-size", "50", "--no-progress",
         "--diagnostics-points", "20"]  # fmt: skip



def _one_line(capsys) -> str:
    """The one error line on stderr (progress lines, ``amortized: ...``, aside)."""
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("amortized: ") or "error:" in line]  # fmt: skip
    assert len(lines) == 1, lines
    return lines[0]


def test_a_full_disk_while_saving_is_one_line_and_a_rerun_with_room_completes(tiny_npz, tmp_path):
    """A real write failure from the OS (the file-size limit, as a full disk would): exit
    2, one line naming the file, no temporary file left, and a rerun with room ends where
    an uninterrupted run does."""
    run, clean = tmp_path / "run", tmp_path / "clean"
    argv = ["train", "--dataset", str(tiny_npz), *QUICK, "--epochs", "2"]
    assert main([*argv, "--run-dir", str(clean)]) == 0
    limit = (clean / "checkpoint.pt").stat().st_size // 2  # room for the small files only
    code = (
        "import resource, signal, sys; from amortized.apps.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.exit(main({[*argv, '--run-dir', str(run)]!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines()
             if not line.startswith("amortized: ") or "error:" in line]  # fmt: skip
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "checkpoint.pt" in lines[0] and "File too large" in lines[0]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert main([*argv, "--run-dir", str(run)]) == 0  # room again
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run)]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(clean)]


def test_a_killed_writer_s_temporary_file_is_removed_by_the_next_holder(tmp_path):
    stale = tmp_path / ".checkpoint.pt.ab12cd_9.tmp"
    stale.write_bytes(b"x" * 1000)
    (tmp_path / ".notes.tmp").write_text("not ours")  # a name atomic_file never makes
    (tmp_path / "keep.pt").write_text("a real file")
    with lock_directory(tmp_path):
        assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".notes.tmp", "keep.pt"]
    assert remove_stale_temporaries(tmp_path) == []


def test_a_kill_during_a_save_leaves_a_temporary_that_the_rerun_removes(tiny_npz, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--dataset", str(tiny_npz), "--run-dir", str(run), *QUICK, "--epochs", "1"]
    code = (  # killed in the middle of writing the checkpoint's bytes
        "import os, signal, sys\nimport amortized.train.checkpoint as c\n"
        "class Dying:\n"
        "    def __init__(self, f): self.f = f\n"
        "    def write(self, b): self.f.write(bytes(b)[:100]); self.f.flush(); "
        "os.kill(os.getpid(), signal.SIGKILL)\n"
        "real = c.atomic_file\n"
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def dying(path):\n"
        "    with real(path) as f: yield Dying(f)\n"
        "c.atomic_file = dying\n"
        f"from amortized.apps.cli import main; sys.exit(main({argv!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert [p.name for p in run.glob(".checkpoint.pt.*.tmp")]  # the kill left one behind
    assert main(argv) == 0
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("name", ["config.toml", "metrics.jsonl", "model.pt", "checkpoint.pt"])
def test_outputs_never_write_through_a_planted_link(tiny_npz, tmp_path, name, capsys):
    run, target = tmp_path / "run", tmp_path / "elsewhere.txt"
    run.mkdir()
    target.write_text("precious")
    (run / name).symlink_to(target)
    code = main(["train", "--dataset", str(tiny_npz), "--run-dir", str(run), *QUICK,
                 "--epochs", "1"])  # fmt: skip
    assert target.read_text() == "precious"
    if name == "metrics.jsonl":  # logged epochs of no run of ours: refused
        assert code == 2 and "holds another run" in _one_line(capsys)
    elif name in ("checkpoint.pt", "model.pt"):  # read first: not a checkpoint, refused
        assert code == 2 and "truncated or corrupt" in _one_line(capsys)
    else:  # written atomically: the link itself is replaced, never its target
        assert code == 0 and not (run / name).is_symlink()


def test_an_appended_output_refuses_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(target)
    with pytest.raises(OSError, match="metrics.jsonl: .*symbolic link|symbolic link"):
        open_for_append(tmp_path / "metrics.jsonl")
    assert target.read_text() == "precious"
    with open_for_append(tmp_path / "new.jsonl") as f:
        f.write(b"{}\n")
    assert (tmp_path / "new.jsonl").read_text() == "{}\n"


def test_a_planted_lock_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"), lock_directory(run):
        pass
    assert target.read_text() == "precious"


def test_a_device_this_machine_lacks_is_named_before_anything_is_written(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"device cuda: no CUDA GPU is available here"):
        parse_device("cuda")
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--device", "cuda:1"]) == 2
    assert "no CUDA GPU is available" in _one_line(capsys)
    assert not (tmp_path / "r" / "config.toml").exists()
    assert main(["gap", str(tmp_path / "r"), "--device", "cuda"]) == 2
    err = _one_line(capsys)
    assert "no CUDA GPU" in err and "corrupt" not in err


def test_a_checkpoint_carrying_a_pickled_object_is_named_as_such(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "amortized-train-v1", "payload": Path("x")}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "pickled Python object (pathlib" in message and "not written by amortized" in message
    assert "weights_only" not in message and "corrupt" not in message


@pytest.mark.parametrize("setting", [{"latent_dim": 10**9}, {"hidden": (10**6, 10**6)},
                                     {"latent_dim": 2**62}])  # fmt: skip
def test_networks_too_large_for_memory_are_refused_before_anything_is_allocated(setting, tmp_path):
    config = TrainConfig(**{"epochs": 1, "progress": False, **setting})
    with pytest.raises(ConfigError, match="the networks (have|this config describes)"):
        check_size(config, 784)
    with pytest.raises(ConfigError):
        train(config, tmp_path)
    assert not (tmp_path / "config.toml").exists()


def test_every_built_in_network_is_counted_without_allocating(monkeypatch):
    """The size check builds every decoder, encoder, family and route on the meta device:
    none is refused at ordinary sizes, and each count is the real one."""
    from amortized.train.factory import build

    for decoder, encoder in [("mlp", "mlp"), ("conv", "conv"), ("made", "mlp"),
                             ("pixelcnn", "mlp")]:  # fmt: skip
        for family in ("diagonal", "fullcov", "planar", "iaf"):
            config = TrainConfig(decoder=decoder, encoder=encoder, family=family,
                                 latent_dim=4, hidden=(8,), made_hidden=(8,),
                                 conv_channels=(2, 2), pixelcnn_channels=2, pixelcnn_layers=1,
                                 pixelcnn_kernel=3)  # fmt: skip
            counted = check_size(config, 784, (28, 28))
            modules = build(config, 784, (28, 28))
            real = sum(t.numel() for m in modules if isinstance(m, torch.nn.Module)
                       for t in (*m.parameters(), *m.buffers()))  # fmt: skip
            assert counted == real, (decoder, family)
    for inference in ("savae", "vae+svi", "svi", "iterative"):
        assert check_size(TrainConfig(inference=inference, latent_dim=4, hidden=(8,)), 784) > 0


def test_a_fresh_write_after_a_kill_is_complete(tmp_path):
    write_atomic(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["x.json"]
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # the limit used above exists here


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_arrays_too_large_for_memory_are_refused_from_their_headers(tmp_path, suffix,
                                                                    monkeypatch):  # fmt: skip
    """A compressed file is sized from its .npy headers before anything is decompressed:
    10,000 x 784 zeros are 40 KB stored and 31 MB as float32."""
    import amortized.data.arrays as arrays

    path = tmp_path / f"zeros{suffix}"
    zeros = np.zeros((10_000, 784), np.float32)
    if suffix == ".npz":
        np.savez_compressed(path, train=zeros, test=zeros[:10])
        assert path.stat().st_size < 200_000
    else:
        np.save(path, zeros)
    stored = arrays.stored_arrays(path)
    assert stored[next(iter(stored))] == ((10_000, 784), np.dtype(np.float32))
    monkeypatch.setattr(arrays, "free_memory", lambda device: 20 * 2**20)  # 20 MiB free

    def never(*args, **kwargs):
        raise AssertionError("the arrays were loaded before their size was checked")

    monkeypatch.setattr(np, "load", never)
    with pytest.raises(DataError, match=rf"zeros{suffix}: its arrays would take 0.\d GiB"):
        load_dataset(str(path))
    monkeypatch.undo()
    assert load_dataset(str(path)).train.shape[1] == 784  # with the memory, it loads
