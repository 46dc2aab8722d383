"""A fault campaign: kill training at random moments, damage checkpoints, fill the disk.

    python benchmarks/faults.py --kills 10 --damages 500 --full-disks 50

1. Kills: the command-line training of a small VAE is SIGKILLed at a random moment after
   its first checkpoint, ``--kills-per-run`` times, then run to the end; its metrics and
   weights must equal an uninterrupted run's. Counted: kills, resumed runs identical.
2. Damage: the final checkpoint of that run is damaged at random (a flipped bit, a
   truncation, a zeroed block, appended bytes) ``--damages`` times; each damaged file must
   be refused with a CheckpointError or load exactly the saved contents (the damage hit
   bytes that carry none). Counted: refused, loaded intact, loaded wrong (lost).
3. Full disk: ``save_atomic`` is made to fail with ENOSPC after a random number of bytes
   ``--full-disks`` times; the previous checkpoint must still load, unchanged, with no
   temporary file left behind.

Prints the counts; anything lost is a bug.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from amortized.data import load_dataset
from amortized.train import read_metrics
from amortized.train.checkpoint import CheckpointError, load_checkpoint, save_atomic


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run)]


def _same_run(a: Path, b: Path) -> bool:
    if _metrics(a) != _metrics(b):
        return False
    wa, wb = load_checkpoint(a / "model.pt"), load_checkpoint(b / "model.pt")
    return all(torch.equal(wa[p][k], wb[p][k]) for p in ("model", "encoder") for k in wa[p])


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN == NaN here


def kills(work: Path, runs: int, per_run: int, rng: np.random.Generator) -> dict:
    full = load_dataset("mnist5k")
    data = work / "tiny.npz"
    np.savez(data, train=full.train[:600].numpy(), valid=full.valid[:100].numpy(),
             test=full.test[:100].numpy())  # fmt: skip
    args = [sys.executable, "-m", "amortized", "train", "--dataset", str(data),
            "--latent-dim", "2", "--hidden", "32", "--epochs", "30", "--batch-size", "20",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([*args, "--run-dir", str(work / "whole")], check=True, env=env)
    done = {"kills": 0, "runs": runs, "identical": 0, "finished_before_kill": 0}
    for r in range(runs):
        run = work / f"killed-{r}"
        for _ in range(per_run):
            proc = subprocess.Popen([*args, "--run-dir", str(run)], env=env)
            deadline = time.time() + 120
            while not (run / "checkpoint.pt").exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            if proc.wait() == -signal.SIGKILL:
                done["kills"] += 1
            else:
                done["finished_before_kill"] += 1
        subprocess.run([*args, "--run-dir", str(run)], check=True, env=env)
        done["identical"] += _same_run(work / "whole", run)
    return done


def damages(checkpoint: Path, work: Path, n: int, rng: np.random.Generator) -> dict:
    data = checkpoint.read_bytes()
    saved = load_checkpoint(checkpoint)
    counts = {"tried": n, "refused": 0, "loaded_intact": 0, "loaded_wrong": 0}
    target = work / "damaged.pt"
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:  # one flipped bit
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # truncated
            b = b[: int(rng.integers(len(b)))]
        elif kind == 2:  # a zeroed block
            start = int(rng.integers(len(b)))
            end = min(len(b), start + int(rng.integers(1, 4096)))
            b[start:end] = bytes(end - start)
        else:  # bytes appended
            b += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        target.write_bytes(bytes(b))
        try:
            loaded = load_checkpoint(target)
        except CheckpointError:
            counts["refused"] += 1
            continue
        counts["loaded_intact" if _equal(loaded, saved) else "loaded_wrong"] += 1
    return counts


def full_disks(work: Path, n: int, rng: np.random.Generator) -> dict:
    path = work / "disk" / "checkpoint.pt"
    path.parent.mkdir()
    previous = {"format": "t", "w": torch.randn(200, 50), "epoch": 1}
    save_atomic(previous, path)
    size = path.stat().st_size
    counts = {"tried": n, "failed_cleanly": 0, "previous_intact": 0, "temporaries_left": 0}
    real_save = torch.save
    for _ in range(n):
        budget = int(rng.integers(0, size))

        def filling_save(obj, f, budget=budget):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:budget])
            raise OSError(errno.ENOSPC, "No space left on device")

        torch.save = filling_save
        try:
            save_atomic({"format": "t", "w": torch.randn(200, 50), "epoch": 2}, path)
        except OSError as err:
            counts["failed_cleanly"] += err.errno == errno.ENOSPC
        finally:
            torch.save = real_save
        counts["previous_intact"] += _equal(load_checkpoint(path), previous)
        counts["temporaries_left"] += len(list(path.parent.glob("*.tmp")))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=5, help="runs to kill and resume")
    ap.add_argument("--kills-per-run", type=int, default=2)
    ap.add_argument("--damages", type=int, default=400)
    ap.add_argument("--full-disks", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"kills": kills(work, args.kills, args.kills_per_run, rng)}
        result["damages"] = damages(work / "whole" / "checkpoint.pt", work, args.damages, rng)
        result["full_disks"] = full_disks(work, args.full_disks, rng)
    print(json.dumps(result, indent=2))
    lost = (result["kills"]["runs"] - result["kills"]["identical"]
            + result["damages"]["loaded_wrong"]
            + result["full_disks"]["tried"] - result["full_disks"]["previous_intact"])  # fmt: skip
    print(f"anything lost: {'no' if lost == 0 else f'YES, {lost} cases'}")


if __name__ == "__main__":
    main()
