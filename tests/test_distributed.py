"""Training on two processes with torchrun and DDP (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from amortized.config import ConfigError, TrainConfig
from amortized.data import load_dataset
from amortized.train import load_run, read_metrics, train


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    full = load_dataset("mnist5k")
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, train=full.train[:400].numpy(), valid=full.valid[:101].numpy(),
             test=full.test[:50].numpy())  # fmt: skip
    return path


def _torchrun(args, cwd, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "amortized", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("inference", ["amortized", "savae"])
def test_two_processes_train_in_step_and_rank_0_writes_the_run(tiny_npz, tmp_path, inference):
    run = tmp_path / "run"
    args = ["train", "--dataset", str(tiny_npz), "--latent-dim", "2", "--hidden", "16",
            "--epochs", "3", "--batch-size", "50", "--inference", inference, "--svi-steps", "2",
            "--run-dir", str(run), "--no-progress"]  # fmt: skip
    done = _torchrun(args, tmp_path)
    # train() raises on every process if their parameters drift apart (assert_in_sync)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # one line per epoch: rank 0 alone writes
    assert metrics[-1]["best_valid_elbo"] > metrics[0]["valid_elbo"]
    trained = load_run(run)
    # the validation ELBO the processes agreed on is the whole split's (101 rows, odd:
    # shares of 51 and 50), close to what one process measures on the saved model
    from amortized.train import evaluate_elbo, prepare_split

    valid_x = prepare_split(load_dataset(str(tiny_npz)), "valid", "bernoulli", 0)
    torch.manual_seed(0)
    one = evaluate_elbo(trained.model, trained.encoder, trained.family, valid_x, 200,
                        config=trained.config)  # fmt: skip
    assert one == pytest.approx(metrics[-1]["best_valid_elbo"], abs=1.0)


def test_distributed_training_refuses_modes_with_two_objectives(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="distributed training supports"):
        train(TrainConfig(inference="vae+svi", epochs=1, progress=False), tmp_path)


def test_a_gap_report_shared_by_two_processes_equals_one_process_s(tiny_npz, tmp_path):
    from amortized.apps.cli import main

    run = tmp_path / "run"
    config = TrainConfig(dataset=str(tiny_npz), latent_dim=2, hidden=(16,), epochs=1,
                         batch_size=50, progress=False)  # fmt: skip
    train(config, run)
    # 23 points in blocks of 4: 6 blocks, the last one short; rank 0 takes 3, rank 1 takes 3
    gap = ["gap", str(run), "--max-points", "23", "--eval-batch-size", "4", "--iwae-k", "20",
           "--elbo-samples", "10", "--local-steps", "30", "--ais-steps", "3", "--ais-chains", "2",
           "--families", "planar", "--refine-steps", "0,2", "--eval-seed", "5",
           "--no-progress"]  # fmt: skip
    assert main([*gap, "--output", str(tmp_path / "one.json")]) == 0
    done = _torchrun([*gap, "--output", str(tmp_path / "two.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["n"] == two["n"] == 23
    # exactly, every datapoint (NaN where too few weights for a k-hat)
    assert json.dumps(one["per_datapoint"]) == json.dumps(two["per_datapoint"])
    for key in ("log_px", "elbo_amortized", "amortization_gap", "inference_gap"):
        assert one[key] == two[key]
    assert one["local_fit"] == two["local_fit"]
    assert one["seconds_per_datapoint"].keys() == two["seconds_per_datapoint"].keys()
