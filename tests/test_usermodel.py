"""Your own model on the command line: the same report as the Python API, and every
mistake in the user's module one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amortized.apps.cli import main
from amortized.apps.study import measure_gaps
from amortized.apps.usermodel import load_user_model
from amortized.config import ConfigError, GapConfig, TrainConfig
from amortized.data import load_dataset
from amortized.train import Trained, evaluation_subset, prepare_split

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_model.py"
GAP = ["--max-points", "30", "--iwae-k", "40", "--elbo-samples", "10", "--local-steps", "30",
       "--eval-batch-size", "15", "--refine-steps", "0,3", "--no-progress"]  # fmt: skip


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("amortized: ") or "error:" in line]  # fmt: skip
    assert len(lines) == 1, lines
    return lines[0]


def _example_with_weights(tmp_path, seed: int):
    """30 test images, the example model built under ``seed``, and its weights saved."""
    x = evaluation_subset(prepare_split(load_dataset("mnist5k"), "test", "bernoulli"), 30)
    torch.manual_seed(seed)
    user = load_user_model(f"{EXAMPLE}:build", x)
    weights = tmp_path / "weights.pt"
    torch.save({"model": user.model.state_dict(), "encoder": user.encoder.state_dict()}, weights)
    return x, user, weights


def test_a_module_on_the_command_line_gives_the_python_api_s_report(tmp_path):
    x, user, weights = _example_with_weights(tmp_path, seed=3)
    out = tmp_path / "cli.json"
    assert main(["gap", "--model", f"{EXAMPLE}:build", "--weights", str(weights),
                 "--output", str(out), *GAP]) == 0  # fmt: skip
    cli = json.loads(out.read_text())
    config = GapConfig(max_points=30, iwae_k=40, elbo_samples=10, local_steps=30,
                       eval_batch_size=15, refine_steps=(0, 3))  # fmt: skip
    trained = Trained(user.model, user.encoder, user.family, TrainConfig(latent_dim=8))
    api = measure_gaps(trained, x, config, progress=False).to_dict()
    for key in ("log_px", "elbo_amortized", "elbo_local", "amortization_gap", "refinement",
                "per_datapoint", "data_id"):  # fmt: skip
        assert json.dumps(cli[key]) == json.dumps(api[key]), key


def test_a_module_by_import_path_works_too(tmp_path, monkeypatch):
    (tmp_path / "my_vaes").mkdir()
    (tmp_path / "my_vaes" / "__init__.py").write_text(EXAMPLE.read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "report.json"
    assert main(["gap", "--model", "my_vaes:build", "--output", str(out), *GAP]) == 0
    assert json.loads(out.read_text())["n"] == 30


BAD_MODULES = {
    "raises.py": ("import nothing_such\n", "cannot import .*ModuleNotFoundError"),
    "syntax.py": ("def build(:\n", "cannot import .*SyntaxError"),
    "nobuild.py": ("x = 1\n", "has no function 'build'"),
    "tuple2.py": ("def build(d):\n    return 1, 2\n", r"expected \(model, encoder, family\)"),
    "types.py": ("def build(d):\n    return 1, 2, 3\n", "the model must be a LatentVariableModel"),
    "fails.py": ("def build(d):\n    raise RuntimeError('no GPU here')\n",
                 r"build\(784\) raised RuntimeError: no GPU here"),
    "wrongdim.py": (EXAMPLE.read_text().replace("Decoder(data_dim)", "Decoder(data_dim + 1)"),
                    "does not fit the data"),
    "wronglam.py": (EXAMPLE.read_text().replace("family.num_params)", "3)"),
                    "the encoder gives lambda of shape"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_MODULES))
def test_every_mistake_in_a_module_is_one_line(name, tmp_path, capsys):
    text, message = BAD_MODULES[name]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "report.json"
    assert main(["gap", "--model", f"{path}:build", "--output", str(out), *GAP]) == 2
    assert __import__("re").search(message, _error(capsys)), message
    assert not out.exists()


def test_weights_that_do_not_fit_and_mixed_arguments_are_one_line(tmp_path, capsys):
    torch.save({"model": {"nope": torch.zeros(1)}, "encoder": {}}, tmp_path / "w.pt")
    assert main(["gap", "--model", f"{EXAMPLE}:build", "--weights", str(tmp_path / "w.pt"),
                 "--output", str(tmp_path / "r.json"), *GAP]) == 2  # fmt: skip
    assert "do not fit the model" in _error(capsys)
    np.save(tmp_path / "small.npy", np.random.default_rng(0).random((40, 16)))
    assert main(["gap", "--model", f"{EXAMPLE}:build", "--dataset", str(tmp_path / "small.npy"),
                 "--output", str(tmp_path / "r.json"), *GAP]) == 0  # fmt: skip
    assert main(["gap", str(tmp_path), "--model", f"{EXAMPLE}:build", *GAP]) == 2
    assert "not both" in _error(capsys)
    assert main(["gap", str(tmp_path), "--weights", "w.pt", *GAP]) == 2
    assert "go with --model" in _error(capsys)
    with pytest.raises(ConfigError, match="expected module:function"):
        load_user_model("just_a_name", torch.zeros(2, 4))


def test_a_study_of_one_s_own_model_measures_without_training(tmp_path, capsys):
    x, user, weights = _example_with_weights(tmp_path, seed=4)
    run = tmp_path / "study"
    assert main(["study", "--model", f"{EXAMPLE}:build", "--weights", str(weights),
                 "--run-dir", str(run), "--train-subset", "20", *GAP]) == 0  # fmt: skip
    report = (run / "report.md").read_text()
    assert f"Model: your own, `{EXAMPLE}:build`, weights {weights}; z in R^8." in report
    assert not (run / "metrics.jsonl").exists() and not (run / "model.pt").exists()
    test = json.loads((run / "gaps_test.json").read_text())
    config = GapConfig(max_points=30, iwae_k=40, elbo_samples=10, local_steps=30,
                       eval_batch_size=15, refine_steps=(0, 3))  # fmt: skip
    trained = Trained(user.model, user.encoder, user.family, TrainConfig(latent_dim=8))
    api = measure_gaps(trained, x, config, progress=False).to_dict()
    assert json.dumps(test["per_datapoint"]) == json.dumps(api["per_datapoint"])
    assert main(["study", "--weights", str(weights), "--run-dir", str(tmp_path / "x")]) == 2
    assert "--weights goes with --model" in _error(capsys)
