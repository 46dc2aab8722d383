"""A fault campaign: kill training at random moments, damage checkpoints, fill the disk.

    python benchmarks/faults.py --kills 10 --damages 500 --full-disks 50

1. Kills: the command-line training of a small VAE is SIGKILLed at a random moment after
   its first checkpoint, ``--kills-per-run`` times, then run to the end; its metrics and
   weights must equal an uninterrupted run's. Counted: kills, resumed runs identical.
2. Damage: the final checkpoint of that run is damaged at random (a flipped bit, a
   truncation, a zeroed block, appended bytes) ``--damages`` times; each damaged file must
   be refused with a CheckpointError or load exactly the saved contents (the damage hit
   bytes that carry none). Counted: refused, loaded intact, loaded wrong (lost).
3. Full disk, for real: ``train`` runs in a child process under a file-size limit
   (RLIMIT_FSIZE, which fails writes as a full disk does) drawn at random ``--full-disks``
   times, and, where this process may mount one (root), on a tmpfs of a random size
   smaller than the run needs. Each must end with exit 2, one error line and no
   traceback, the last checkpoint loading unchanged, no temporary file left, and a rerun
   with room must end as an uninterrupted run does.
4. Kills of ``gap``, ``study`` and ``collapse`` at random moments (``--kills`` each), then
   rerun: the gap report, the study's reports and the collapse study's rows must equal an
   uninterrupted run's.
5. Concurrent starts: two ``train`` processes on one run directory at once
   (``--concurrent`` times): one must train, the other be refused naming the holder, and
   the run equal an uninterrupted one.
6. Bad inputs: every numeric option outside its declared bounds, every choice misspelt,
   wrong types, and damaged files (data, configs) on every command; counted by how they
   end: a one-line error (exit 2), or a traceback (a bug).

Prints the counts; anything lost, or any traceback, is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io as _io
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

from amortized.apps.cli import main as cli
from amortized.config import CollapseConfig, GapConfig, StudyConfig, TrainConfig, choices
from amortized.data import load_dataset
from amortized.train import read_metrics
from amortized.train.checkpoint import CheckpointError, load_checkpoint


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


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
QUICK = ["--latent-dim", "2", "--hidden", "16", "--batch-size", "50", "--no-progress",
         "--diagnostics-points", "20"]  # fmt: skip
GAP = ["--iwae-k", "20", "--elbo-samples", "10", "--local-steps", "50", "--eval-batch-size",
       "20"]  # fmt: skip


def _tiny(work: Path) -> Path:
    full = load_dataset("mnist5k")
    data = work / "tiny.npz"
    if not data.exists():
        np.savez(data, train=full.train[:600].numpy(), valid=full.valid[:100].numpy(),
                 test=full.test[:100].numpy())  # fmt: skip
    return data


def _error_lines(stderr: str) -> list[str]:
    """The error lines of a command's stderr: progress lines and warnings (``amortized: ...``
    but not ``amortized: error: ...``) left out."""
    return [line for line in stderr.strip().splitlines()
            if not line.startswith("amortized: ") or line.startswith("amortized: error")]


def full_disks(work: Path, n: int, rng: np.random.Generator) -> dict:
    data = _tiny(work)
    args = [sys.executable, "-m", "amortized", "train", "--dataset", str(data), *QUICK,
            "--epochs", "4"]  # fmt: skip
    subprocess.run([*args, "--run-dir", str(work / "disk-whole")], check=True, env=ENV,
                   capture_output=True)  # fmt: skip
    size = (work / "disk-whole" / "checkpoint.pt").stat().st_size
    counts = {"tried": 0, "one_line": 0, "tracebacks": 0, "previous_intact": 0,
              "temporaries_left": 0, "resumed_identical": 0, "tmpfs": 0}  # fmt: skip
    for i in range(n):
        run = work / f"disk-{i}"
        limit = int(rng.integers(200, size))
        code = ("import resource, runpy, signal, sys\n"
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
                f"sys.argv = {['amortized', *args[3:], '--run-dir', str(run)]!r}\n"
                "runpy.run_module('amortized', run_name='__main__')")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        _count_disk(counts, done, run, args, work)
    if os.geteuid() == 0 and n:  # a real full filesystem: between one and two checkpoints
        for i in range(max(1, n // 5)):
            mount = work / f"tmpfs-{i}"
            mount.mkdir()
            room = int(rng.integers(size + 4096, 2 * size))
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs",
                               str(mount)], capture_output=True).returncode:  # fmt: skip
                break
            try:
                run = mount / "run"
                done = subprocess.run([*args, "--run-dir", str(run)], env=ENV,
                                      capture_output=True, text=True, timeout=300)  # fmt: skip
                counts["tmpfs"] += 1
                _count_disk(counts, done, run, args, work, moved_from=mount)
            finally:
                subprocess.run(["umount", str(mount)], capture_output=True)
    return counts


def _count_disk(counts, done, run, args, work, moved_from=None):
    """Count how a run that met a full disk ended: its error line, its checkpoint (absent,
    or a complete earlier one whose digest checks), its temporaries, and its resumption."""
    counts["tried"] += 1
    errors = _error_lines(done.stderr)
    counts["tracebacks"] += "Traceback" in done.stderr
    counts["one_line"] += done.returncode == 2 and len(errors) == 1 and (
        "File too large" in errors[0] or "No space left" in errors[0])
    counts["temporaries_left"] += len(list(run.glob(".*.tmp"))) if run.exists() else 0
    checkpoint = run / "checkpoint.pt"
    try:
        intact = not checkpoint.exists() or load_checkpoint(checkpoint)["epoch"] >= 1
    except CheckpointError:
        intact = False
    counts["previous_intact"] += intact
    if moved_from is not None:  # off the full filesystem, to resume with room
        target = work / f"resumed-{moved_from.name}"
        subprocess.run(["cp", "-a", str(run), str(target)], check=True)
        run = target
    subprocess.run([*args, "--run-dir", str(run)], env=ENV, capture_output=True, timeout=300)
    counts["resumed_identical"] += _same_run(work / "disk-whole", run)


def _kill_at_random(argv: list[str], ready: Path, rng: np.random.Generator) -> bool:
    """Start ``argv``, wait for ``ready`` to exist, SIGKILL it a random moment later; True
    if the kill landed before it finished."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def _report_values(path: Path):
    report = json.loads(path.read_text())
    return {k: v for k, v in report.items() if k != "seconds_per_datapoint"}


def app_kills(work: Path, n: int, rng: np.random.Generator) -> dict:
    data = _tiny(work)
    amortized = [sys.executable, "-m", "amortized"]
    trained = work / "apps-trained"
    subprocess.run([*amortized, "train", "--dataset", str(data), "--run-dir", str(trained),
                    *QUICK, "--epochs", "3"], check=True, env=ENV, capture_output=True)  # fmt: skip
    gap = [*amortized, "gap", str(trained), *GAP, "--eval-seed", "1", "--no-progress"]
    study = [*amortized, "study", "--dataset", str(data), *QUICK, *GAP, "--epochs", "3",
             "--train-subset", "60", "--refine-steps", "0,5"]  # fmt: skip
    collapse = [*amortized, "collapse", "--dataset", str(data), "--made-hidden", "16",
                "--latent-dim", "2", "--epochs", "2", "--savae-epochs", "1", "--train-points",
                "200", "--valid-points", "0", "--test-points", "20", "--iwae-k", "4",
                "--vq-latents", "2", "--vq-code-dim", "2", "--vq-codebook", "4",
                "--prior-epochs", "1"]  # fmt: skip
    subprocess.run([*gap, "--output", str(work / "gap-whole.json")], check=True, env=ENV,
                   capture_output=True)  # fmt: skip
    subprocess.run([*study, "--run-dir", str(work / "study-whole")], check=True, env=ENV,
                   capture_output=True)  # fmt: skip
    subprocess.run([*collapse, "--run-dir", str(work / "collapse-whole")], check=True, env=ENV,
                   capture_output=True)  # fmt: skip
    whole_rows = json.loads((work / "collapse-whole" / "results.json").read_text())["rows"]
    counts = {}
    for name in ("gap", "study", "collapse"):
        counts[name] = {"tried": n, "killed": 0, "identical": 0}
    for i in range(n):
        out = work / f"gap-{i}.json"
        counts["gap"]["killed"] += _kill_at_random([*gap, "--output", str(out)],
                                                   trained / ".lock", rng)  # fmt: skip
        subprocess.run([*gap, "--output", str(out)], env=ENV, capture_output=True)
        counts["gap"]["identical"] += (
            out.exists() and _report_values(out) == _report_values(work / "gap-whole.json"))
        run = work / f"study-{i}"
        counts["study"]["killed"] += _kill_at_random([*study, "--run-dir", str(run)],
                                                     run / "checkpoint.pt", rng)  # fmt: skip
        subprocess.run([*study, "--run-dir", str(run)], env=ENV, capture_output=True)
        counts["study"]["identical"] += all(
            (run / f).exists() and _report_values(run / f)
            == _report_values(work / "study-whole" / f)
            for f in ("gaps_train.json", "gaps_test.json")
        ) and _same_run(work / "study-whole", run)
        run = work / f"collapse-{i}"
        ready = run / "plain" / "checkpoint.pt"
        counts["collapse"]["killed"] += _kill_at_random([*collapse, "--run-dir", str(run)],
                                                        ready, rng)  # fmt: skip
        subprocess.run([*collapse, "--run-dir", str(run)], env=ENV, capture_output=True)
        rows = json.loads((run / "results.json").read_text())["rows"] if (
            run / "results.json").exists() else {}  # fmt: skip
        strip = lambda rs: {k: {a: b for a, b in v.items() if a != "seconds"}  # noqa: E731
                            for k, v in rs.items()}  # fmt: skip
        counts["collapse"]["identical"] += strip(rows) == strip(whole_rows)
    return counts


def concurrent(work: Path, n: int) -> dict:
    data = _tiny(work)
    args = [sys.executable, "-m", "amortized", "train", "--dataset", str(data), *QUICK,
            "--epochs", "4"]  # fmt: skip
    whole = work / "disk-whole"
    if not whole.exists():
        subprocess.run([*args, "--run-dir", str(whole)], check=True, env=ENV, capture_output=True)
    counts = {"tried": n, "one_trained_one_refused": 0, "identical": 0}
    for i in range(n):
        run = work / f"concurrent-{i}"
        procs = [subprocess.Popen([*args, "--run-dir", str(run)], env=ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]  # fmt: skip
        ends = [(p.wait(), p.communicate()[1]) for p in procs]
        codes = sorted(code for code, _ in ends)
        refused = [err for code, err in ends if code == 2]
        counts["one_trained_one_refused"] += codes == [0, 2] and "is in use by process" in (
            refused[0] if refused else "")
        counts["identical"] += _same_run(whole, run)
    return counts


def bad_inputs(work: Path) -> dict:
    """Every bad value each command takes, in-process: how many end in a traceback."""
    data = _tiny(work)
    trained = work / "bad-trained"
    if cli(["train", "--dataset", str(data), "--run-dir", str(trained), *QUICK,
            "--epochs", "1"]) != 0:  # fmt: skip
        raise RuntimeError("could not train the model the bad inputs are tried on")
    files = _bad_files(work)
    cases = []
    for command, classes in (("train", [TrainConfig()]), ("gap", [GapConfig()]),
                             ("study", [StudyConfig().train, StudyConfig().gap, StudyConfig()]),
                             ("collapse", [CollapseConfig()])):  # fmt: skip
        head = {"train": ["train", "--dataset", str(data)], "gap": ["gap", str(trained)],
                "study": ["study", "--dataset", str(data)],
                "collapse": ["collapse", "--dataset", str(data)]}[command]  # fmt: skip
        for defaults in classes:
            for f in dataclasses.fields(defaults):
                if dataclasses.is_dataclass(getattr(defaults, f.name)) or f.name in (
                        "progress", "dataset", "data_dir", "device"):  # fmt: skip
                    continue
                for value in _bad_values(type(defaults), f):
                    cases.append([*head, f"--{f.name.replace('_', '-')}={value}"])
        for name, path in files.items():
            if name.endswith("toml"):
                cases.append([*head, "--config", str(path)])
            elif command != "gap":
                cases.append([command, "--dataset", str(path)])
        cases.append([*head, "--device", "tpu"])
        cases.append([*head, "--device", "cuda:7"])
    counts = {"tried": 0, "one_line": 0, "tracebacks": 0, "other": 0, "examples": []}
    for i, argv in enumerate(cases):
        run_dir = work / f"bad-{i}"
        argv = [*argv] if argv[0] == "gap" else [*argv, "--run-dir", str(run_dir)]
        err = _io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
            try:
                code = cli([*argv, "--no-progress"] if "--progress" not in argv else argv)
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code
            except BaseException as exc:  # noqa: BLE001 - a traceback is what is counted
                code, _ = "traceback", exc
        counts["tried"] += 1
        errors = _error_lines(err.getvalue())
        if code == "traceback" or "Traceback" in err.getvalue():
            counts["tracebacks"] += 1
            counts["examples"].append(" ".join(argv[:4]))
        elif code == 2 and len(errors) == 1:
            counts["one_line"] += 1
        else:
            counts["other"] += 1
            counts["examples"].append(f"{' '.join(argv[:4])} -> {code}: {errors[-1:]}")
    counts["examples"] = counts["examples"][:10]
    return counts


def _bad_values(cls, f) -> list[str]:
    """Values field ``f`` must refuse: outside its bounds, not of its type, misspelt."""
    hints = __import__("typing").get_type_hints(cls)
    tp, out = hints[f.name], []
    if "ge" in f.metadata:
        out.append(str(f.metadata["ge"] - 1))
    if "gt" in f.metadata:
        out += [str(f.metadata["gt"]), "nan", "-inf"]
    if tp in (int, float) or "ge" in f.metadata or "gt" in f.metadata:
        out += ["x", "1e400", "1e20"] if tp is int else ["x", "1e400"]
    if tp is bool:
        out.append("maybe")
    with contextlib.suppress(TypeError, KeyError):
        choices(cls, f.name)
        out.append("nope")
    if f.name in ("family", "activation", "inference", "families", "remedies"):
        out.append("nope")
    return out


def _bad_files(work: Path) -> dict[str, Path]:
    bad = work / "bad-files"
    bad.mkdir(exist_ok=True)
    files = {
        "empty.npz": b"",
        "text.npz": b"not a zip",
        "text.npy": b"\x93NUMPY garbage",
        "typo.toml": b"latent_dimm = 3\n",
        "type.toml": b'latent_dim = "three"\n',
        "syntax.toml": b"latent_dim = = 3\n",
        "table.toml": b"[train\n",
        "binary.toml": b"\xff\xfe\x00",
    }
    out = {}
    for name, content in files.items():
        (bad / name).write_bytes(content)
        out[name] = bad / name
    np.save(bad / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(bad / "nan.npy", np.full((30, 4), np.nan, np.float32))
    np.save(bad / "scalar.npy", np.float32(1.0))
    np.savez(bad / "ragged.npz", train=np.zeros((10, 4)), test=np.zeros((10, 5)))
    for name in ("objects.npy", "nan.npy", "scalar.npy", "ragged.npz"):
        out[name] = bad / name
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=5, help="runs of each command to kill")
    ap.add_argument("--kills-per-run", type=int, default=2)
    ap.add_argument("--damages", type=int, default=400)
    ap.add_argument("--full-disks", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"kills": kills(work, args.kills, args.kills_per_run, rng)}
        result["damages"] = damages(work / "whole" / "checkpoint.pt", work, args.damages, rng)
        result["full_disks"] = full_disks(work, args.full_disks, rng)
        result["app_kills"] = app_kills(work, args.kills, rng)
        result["concurrent"] = concurrent(work, args.concurrent)
        result["bad_inputs"] = bad_inputs(work)
    result["seconds"] = round(time.time() - started)
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    fd, ak = result["full_disks"], result["app_kills"]
    lost = (result["kills"]["runs"] - result["kills"]["identical"]
            + result["damages"]["loaded_wrong"]
            + fd["tried"] - fd["previous_intact"] + fd["tried"] - fd["resumed_identical"]
            + sum(c["tried"] - c["identical"] for c in ak.values())
            + result["concurrent"]["tried"] - result["concurrent"]["identical"])  # fmt: skip
    tracebacks = fd["tracebacks"] + result["bad_inputs"]["tracebacks"]
    print(f"anything lost: {'no' if lost == 0 else f'YES, {lost} cases'}; "
          f"tracebacks: {tracebacks}")


if __name__ == "__main__":
    main()
