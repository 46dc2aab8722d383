"""Does a refactor change results? Digests of every run's metrics and weights.

Runs, at quick settings and fixed seeds, ``train`` with every inference route, the
``study`` and the ``collapse`` study, then hashes what each wrote: every metrics.jsonl
record (without its wall-clock ``seconds``), every tensor of model.pt and checkpoint.pt,
and the study's gap reports (without their timings). Two code versions give the same
digests exactly when their runs are bit-identical.

    PYTHONPATH=/path/to/old/src python benchmarks/bit_identity.py --out before.json
    python benchmarks/bit_identity.py --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import amortized
from amortized.data import load_dataset

try:  # the command line's module, wherever the version being checked keeps it
    from amortized.apps.cli import main as cli
except ImportError:  # versions before the concept folders
    from amortized.cli import main as cli

ROUTES = ("amortized", "savae", "vae+svi", "svi", "iterative")
QUICK = ["--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--no-progress",
         "--batch-size", "50", "--diagnostics-points", "20", "--svi-steps", "3"]  # fmt: skip
GAP = ["--iwae-k", "20", "--elbo-samples", "10", "--local-steps", "20",
       "--eval-batch-size", "40", "--refine-steps", "0,2"]  # fmt: skip
TIMINGS = {"seconds", "seconds_per_datapoint", "machine", "wall_seconds"}


def _tiny_data(directory: Path) -> Path:
    """200 / 50 / 40 images of mnist5k as a user's .npz (no download, no ../shared)."""
    full = load_dataset("mnist5k")
    path = directory / "tiny.npz"
    np.savez(path, train=full.train[:200].numpy(), valid=full.valid[:50].numpy(),
             test=full.test[:40].numpy())  # fmt: skip
    return path


def _strip(value):
    """A JSON value without its wall-clock fields (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _flat(per: dict) -> dict:
    """A report's per-datapoint arrays under the flat names every version can write:
    ``elbo_local/<family>``, ``log_px_<estimate>`` and so on, each with its ``_se`` (and,
    for log p(x), ``_khat`` and ``_remaining``); the nested form is flattened."""
    if "elbo_amortized_se" in per or not per:
        return per
    out = {}

    def put(key, rows):
        out[key], out[f"{key}_se"] = rows["value"], rows["mc_se"]
        for extra in ("khat", "remaining"):
            if extra in rows:
                out[f"{key}_{extra}"] = rows[extra]

    put("elbo_amortized", per["elbo_amortized"])
    for kind in ("elbo_refined", "elbo_local"):
        for name, rows in per[kind].items():
            put(f"{kind}/{name}", rows)
    for name, rows in per["log_px_estimates"].items():
        put(f"log_px_{name}", rows)
    chosen = per["log_px_estimates"][per["log_px_chosen"]]
    out["log_px"], out["log_px_se"] = chosen["value"], chosen["mc_se"]
    return out


def _tensors(value, prefix=""):
    """(name, tensor) for every tensor in a nested checkpoint, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _tensors(value[k], f"{prefix}/{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}/{i}")


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name, t in _tensors(state):
            h.update(name.encode())
            buffer = io.BytesIO()
            np.save(buffer, t.detach().cpu().contiguous().numpy(), allow_pickle=False)
            h.update(buffer.getvalue())
    elif path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            h.update(json.dumps(_strip(json.loads(line)), sort_keys=True).encode())
    else:  # a JSON report
        report = json.loads(path.read_text())
        report["per_datapoint"] = _flat(report["per_datapoint"])
        h.update(json.dumps(_strip(report), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _digests(root: Path) -> dict[str, str]:
    names = ("metrics.jsonl", "model.pt", "checkpoint.pt", "gaps_train.json", "gaps_test.json")
    return {
        str(path.relative_to(root)): _digest_file(path)
        for path in sorted(root.rglob("*"))
        if path.name in names
    }


def run_all(root: Path) -> dict[str, str]:
    data = _tiny_data(root)
    for route in ROUTES:
        code = cli(["train", "--dataset", str(data), "--run-dir", str(root / "train" / route),
                    "--inference", route, *QUICK])  # fmt: skip
        assert code == 0, route
    code = cli(["study", "--dataset", str(data), "--run-dir", str(root / "study"),
                "--train-subset", "30", *QUICK, *GAP])  # fmt: skip
    assert code == 0, "study"
    code = cli(["collapse", "--dataset", str(data), "--run-dir", str(root / "collapse"),
                "--made-hidden", "16", "--latent-dim", "2", "--epochs", "2", "--savae-epochs",
                "1", "--train-points", "100", "--valid-points", "0", "--test-points", "20",
                "--iwae-k", "4", "--vq-latents", "2", "--vq-code-dim", "2", "--vq-codebook",
                "4", "--prior-epochs", "1", "--no-progress"])  # fmt: skip
    assert code == 0, "collapse"
    return _digests(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the digests (JSON)")
    parser.add_argument("--compare", help="digests of another version to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        digests = run_all(Path(tmp))
    Path(args.out).write_text(json.dumps(digests, indent=2))
    print(f"{len(digests)} files digested with {amortized.__file__}")
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        differ = sorted(k for k in digests.keys() | other.keys() if digests.get(k) != other.get(k))
        for key in differ:
            print(f"DIFFERS: {key}: {other.get(key)} -> {digests.get(key)}")
        print("bit-identical" if not differ else f"{len(differ)} of {len(digests)} differ")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
