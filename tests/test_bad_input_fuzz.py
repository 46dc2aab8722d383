"""Property-based: malformed command-line values and config files give one-line errors.

Every example is invalid by construction, so nothing trains; each must end with exit
status 2 and exactly one line on stderr, and leave no run directory behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amortized.apps.cli import main
from amortized.config import TrainConfig, tomllib
from amortized.families import FAMILIES
from amortized.inference.refine import METHODS
from amortized.inference.routes import ROUTES
from amortized.nets.decoders import DECODERS
from amortized.nets.layers import ACTIVATIONS
from amortized.train import factory as train_module

#: integer settings and their smallest valid value (None: any integer)
INTS = {"latent_dim": 1, "samples": 1, "epochs": 0, "batch_size": 1, "patience": 1,
        "valid_samples": 1, "svi_steps": 0, "iterations": 1, "pixelcnn_channels": 1,
        "pixelcnn_layers": 1, "seed": None}  # fmt: skip
#: float settings: True where 0 is allowed
FLOATS = {"lr": False, "svi_lr": False, "warmup_epochs": True, "free_bits": True, "grad_clip": True}
CHOICES = {
    "likelihood": DECODERS, "family": FAMILIES, "objective": train_module.OBJECTIVES,
    "inference": tuple(ROUTES), "svi_method": METHODS,
    "lr_schedule": train_module.LR_SCHEDULES, "kl_schedule": train_module.KL_SCHEDULES,
    "free_bits_mode": train_module.FREE_BITS_MODES, "decoder": train_module.DECODER_KINDS,
    "activation": ACTIVATIONS,
}  # fmt: skip


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


texts = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() == s and "\x00" not in s)


def bad_int(low: int | None):
    """Values an integer setting whose smallest valid value is ``low`` must refuse."""
    options = [
        texts.filter(lambda s: not _is_number(s)),
        st.floats(0.1, 0.9).map(lambda v: str(v + 3)),
    ]
    if low is not None:
        options.append(st.integers(max_value=low - 1).map(str))
    return st.one_of(*options)


@st.composite
def bad_option(draw):
    kind = draw(st.sampled_from(["int", "float", "choice"]))
    if kind == "int":
        name = draw(st.sampled_from(sorted(INTS)))
        return name, draw(bad_int(INTS[name]))
    if kind == "float":
        name = draw(st.sampled_from(sorted(FLOATS)))
        return name, draw(bad_float(zero_ok=FLOATS[name]))
    name = draw(st.sampled_from(sorted(CHOICES)))
    return name, draw(bad_choice(CHOICES[name]))


def bad_float(zero_ok: bool):
    """Values a positive (or, with ``zero_ok``, non-negative) float setting must refuse."""
    negative = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr)
    not_number = texts.filter(lambda s: not _is_number(s))
    bad = [st.sampled_from(["nan", "inf", "-inf"]), not_number, negative]
    if not zero_ok:
        bad.append(st.just("0"))
    return st.one_of(*bad)


def bad_choice(ok):
    return texts.filter(lambda s: s.lower() not in ok)


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()  # what earlier examples printed
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        assert main([*argv, "--run-dir", str(run), "--no-progress"]) == 2
        assert not run.exists()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"amortized {argv[0]}: error: ")
    return err


def _refused_by_name(command: str, option: tuple[str, str], capsys) -> None:
    """``--name=value`` is refused in one line that names the setting."""
    name, value = option
    err = _one_line_error([command, f"--{name.replace('_', '-')}={value}"], capsys)
    assert name in err or name.replace("_", "-") in err


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(option=bad_option())
def test_bad_command_line_values(option, capsys):
    _refused_by_name("train", option, capsys)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(sorted({*INTS, *FLOATS, *CHOICES, "hidden"})),
    value=st.one_of(
        st.lists(st.integers(), min_size=1, max_size=3).map(lambda v: [[x] for x in v]),
        st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), min_size=1, max_size=2),
        st.booleans(),
    ),
)
def test_config_files_with_wrong_types(name, value, capsys):
    import tomli_w

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.toml"
        path.write_text(tomli_w.dumps({name: value}))
        _one_line_error(["train", "--config", str(path)], capsys)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(min_size=1, max_size=64))
def test_config_files_that_are_not_toml_or_name_unknown_settings(raw, capsys):
    known = set(TrainConfig.__dataclass_fields__)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.toml"
        path.write_bytes(raw)
        try:  # read as the command does
            data = tomllib.loads(path.read_text())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = None
        if data is not None and set(data) <= known:
            return  # valid TOML naming known settings only: not malformed
        _one_line_error(["train", "--config", str(path)], capsys)


#: the collapse study's integer settings and their smallest valid value
COLLAPSE_INTS = {"epochs": 1, "savae_epochs": 1, "prior_epochs": 1, "iwae_k": 1,
                 "latent_dim": 1, "train_points": 0, "valid_points": 0, "test_points": 0,
                 "vq_latents": 1, "vq_code_dim": 1, "vq_codebook": 1,
                 "pixelcnn_channels": 1, "pixelcnn_layers": 1}  # fmt: skip


@st.composite
def bad_collapse_option(draw):
    kind = draw(st.sampled_from(["decoder", "lr_schedule", "lr", "int"]))
    if kind == "decoder":
        return kind, draw(bad_choice(("made", "pixelcnn")))
    if kind == "lr_schedule":
        return kind, draw(bad_choice(CHOICES["lr_schedule"]))
    if kind == "lr":
        return kind, draw(bad_float(zero_ok=False))
    name = draw(st.sampled_from(sorted(COLLAPSE_INTS)))
    return name, draw(bad_int(COLLAPSE_INTS[name]))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(option=bad_collapse_option())
def test_bad_collapse_study_values(option, capsys):
    _refused_by_name("collapse", option, capsys)
