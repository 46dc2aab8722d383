"""The ``amortized`` command line: ``train``, ``gap``, ``study``, ``generalization``,
``collapse`` and ``download``.

Options are generated from the config dataclasses (one ``--field-name`` per field), so
the command line, the TOML files and the Python API share one set of names and types.
``--config FILE.toml`` loads a config; options given on the command line override it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import (
    REMEDY_FIELDS,
    CollapseConfig,
    ConfigError,
    GapConfig,
    GeneralizationConfig,
    StudyConfig,
    TrainConfig,
    coerce,
    load_config,
)
from ..data import DataError
from ..files import DirectoryBusy
from ..memory import tune_allocator
from ..train.checkpoint import CheckpointError
from ..train.loop import TrainingDiverged

__all__ = ["main"]


def _add_fields(parser: argparse.ArgumentParser, defaults: Any, skip: Sequence[str] = ()) -> None:
    """One option per field of the dataclass ``defaults`` is an instance of, showing that
    instance's values as the defaults (a study's GapConfig is not the gap command's); values
    stay strings until :func:`_apply`."""
    cls = type(defaults)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {_show(getattr(defaults, f.name))})"
        if hints[f.name] is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            group.add_argument(flag, dest=f.name, metavar=f.name.upper(), default=None, help=text)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def _apply(config: Any, args: argparse.Namespace) -> Any:
    """A copy of ``config`` with every option given on the command line, type-checked; a
    nested config (a study's ``train`` and ``gap``) takes the options of its own fields."""
    hints = typing.get_type_hints(type(config))
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(args, f.name, None)
        if dataclasses.is_dataclass(hints[f.name]):
            changes[f.name] = _apply(getattr(config, f.name), args)
        elif value is not None:
            changes[f.name] = coerce(value, hints[f.name], "--" + f.name.replace("_", "-"))
    return dataclasses.replace(config, **changes)


def _config(cls: type, args: argparse.Namespace) -> Any:
    """The command's config: ``--config FILE.toml`` (or the defaults), then its options."""
    return _apply(load_config(cls, args.config) if args.config else cls(), args)


def _print_summary(run_dir: Path, results: dict[str, Any], until: str) -> None:
    """A study's report up to the section ``until``, and where its files are."""
    print((run_dir / "report.md").read_text().split(until)[0].rstrip())
    print(f"\nwrote {run_dir / 'report.md'} and {run_dir / 'results.json'} "
          f"in {results['seconds']:.0f} s")  # fmt: skip


def _add_study_fields(parser: argparse.ArgumentParser, config: Any) -> None:
    """The options of a study's ``train`` and ``gap`` settings and of its own."""
    _add_fields(parser, config.train)
    _add_fields(parser, config.gap, skip=("split",))
    _add_fields(parser, config)


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals as one line (``amortized train: error: ...``), not the
    whole usage block; ``--help`` still shows it. Sub-commands' parsers are of this class."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amortized",
        description="Amortized variational inference, measured: train VAEs, decompose the "
        "inference gap, and report what amortization costs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "study",
        help="train a VAE, measure its gaps on train and test data, write a report",
        description="Train a VAE (or resume its run), measure the inference gaps on a training "
        "subset and on the test split, and write report.md, results.json and PNG plots. "
        "With no options: mnist5k, about 3 minutes on 2 CPU cores.",
    )
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/study-DATASET)")
    p.add_argument("--config", default=None, help="StudyConfig TOML file")
    p.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                   help="measure your own model instead of training one (see `gap --model`)")
    p.add_argument("--weights", default=None, help="with --model: its trained weights (.pt)")
    _add_study_fields(p, StudyConfig())

    p = sub.add_parser(
        "generalization",
        help="how amortized inference generalizes: over training, out of distribution, "
        "with a larger encoder",
        description="Train a VAE on --dataset and one on --shift-dataset (logging the gaps "
        "every --gap-every epochs), score each on both test sets (the amortization gap out of "
        "distribution, and what refinement buys back per millisecond), train a standard and a "
        "larger encoder on the first model's fixed decoder, and write report.md, results.json "
        "and PNG plots. Rerun to resume. Needs both datasets' files (--data-dir).",
    )
    p.add_argument("--run-dir", default=None, help="output directory (default: "
                   "runs/generalization-DATASET-SHIFT_DATASET)")  # fmt: skip
    p.add_argument("--config", default=None, help="GeneralizationConfig TOML file")
    _add_study_fields(p, GeneralizationConfig())

    p = sub.add_parser(
        "train",
        help="train a VAE; rerun the same command to resume a killed run",
        description="Train a VAE into a run directory (config.toml, metrics.jsonl, checkpoint.pt, "
        "model.pt). If the directory holds a checkpoint of the same config, training resumes.",
    )
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/train-DATASET)")
    p.add_argument("--config", default=None, help="TrainConfig TOML file")
    _add_fields(p, TrainConfig())

    p = sub.add_parser(
        "gap",
        help="the inference-gap report of a trained run",
        description="Decompose log p(x) - L[q] into approximation and amortization gaps for the "
        "model in RUN_DIR; prints a table and writes RUN_DIR/gaps_SPLIT.json.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None,
                   help="a directory written by `amortized train` (or give --model)")  # fmt: skip
    p.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                   help="your own model instead of a run: a function of the data's dimension "
                   "returning (model, encoder, family), as my_pkg.my_module:build or "
                   "path/to/file.py:build (see the README)")  # fmt: skip
    p.add_argument("--weights", default=None, help="with --model: a .pt file holding "
                   "{'model': state_dict, 'encoder': state_dict}")  # fmt: skip
    p.add_argument("--dataset", default=None, help="with --model: the data (default: mnist5k)")
    p.add_argument("--data-dir", default=None, help="with --model: where the data's files are")
    p.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="with --model: bernoulli binarizes grey levels once, fixed; gaussian "
                   "keeps them (default: bernoulli)")  # fmt: skip
    p.add_argument("--config", default=None, help="GapConfig TOML file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--output", default=None, help="JSON file (default: RUN_DIR/gaps_SPLIT.json)")
    _add_fields(p, GapConfig())

    p = sub.add_parser(
        "collapse",
        help="the posterior-collapse study: remedies, the decoder alone and a VQ-VAE",
        description="Train an autoregressive-decoder VAE plain and with each remedy (KL "
        "annealing, free bits, aggressive encoder training, SA-VAE), the decoder alone and a "
        "VQ-VAE on the same data; write report.md (NLL, KL, active units, I(x; z), codebook "
        "perplexity; KL per dimension over training), results.json and PNGs. Rerun to "
        "resume. With no options: all of binarized MNIST, about 1 h on one CPU core.",
    )
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/collapse)")
    p.add_argument("--config", default=None, help="CollapseConfig TOML file")
    collapse = CollapseConfig()
    # each remedy sets its REMEDY_FIELDS itself; the study subsets the validation images
    _add_fields(p, collapse.train, skip=(*REMEDY_FIELDS, "valid_points"))
    _add_fields(p, collapse)

    p = sub.add_parser(
        "download",
        help="download a dataset's files (needs a network)",
        description="Download binarized MNIST (Larochelle & Murray), MNIST or Fashion-MNIST "
        "and verify their checksums.",
    )
    p.add_argument("dataset", choices=["binarized-mnist", "mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None, help="target directory")
    return parser


def _study(args: argparse.Namespace) -> None:
    from .study import run_study

    config = _config(StudyConfig, args)
    run_dir = Path(args.run_dir or f"runs/study-{Path(config.train.dataset).stem}")
    if args.weights and not args.model:
        raise ConfigError("--weights goes with --model")
    results = run_study(config, run_dir, model=args.model, weights=args.weights)
    _print_summary(run_dir, results, "## Cost of inference")


def _generalization(args: argparse.Namespace) -> None:
    from .generalization import run_generalization

    config = _config(GeneralizationConfig, args)
    names = (Path(config.train.dataset).stem, Path(config.shift_dataset).stem)
    run_dir = Path(args.run_dir or "runs/generalization-{}-{}".format(*names))
    results = run_generalization(config, run_dir)
    _print_summary(run_dir, results, "## What refinement")


def _train(args: argparse.Namespace) -> None:
    from ..train import train

    config = _config(TrainConfig, args)
    run_dir = Path(args.run_dir or f"runs/train-{Path(config.dataset).stem}")
    train(config, run_dir)
    print(f"trained model in {run_dir / 'model.pt'}")


def _gap(args: argparse.Namespace) -> None:
    import torch

    from .. import distributed
    from ..data import load_dataset
    from ..files import check_writable, lock_directory
    from ..train import Trained, evaluation_subset, load_run, prepare_split
    from ..train.factory import parse_device
    from .study import check_gap_config, measure_gaps
    from .usermodel import load_user_model

    config = _config(GapConfig, args)
    check_gap_config(config)
    device = parse_device(args.device)
    if (args.run_dir is None) == (args.model is None):
        raise ConfigError("give a RUN_DIR written by `amortized train`, or --model (not both)")
    if args.model is None and (args.weights or args.dataset or args.data_dir):
        raise ConfigError("--weights, --dataset and --data-dir go with --model; a run "
                          "directory knows its own")  # fmt: skip
    world = distributed.init(torch.device(device).type)  # torchrun: share the blocks
    if device.startswith("cuda") and world.size > 1:
        device = f"cuda:{world.local_rank}"
    if args.model is None:
        trained = load_run(args.run_dir, device=device)
        dataset = load_dataset(trained.config.dataset, trained.config.data_dir or None)
        likelihood, home = trained.config.likelihood, Path(args.run_dir)
    else:
        dataset = load_dataset(args.dataset or "mnist5k", args.data_dir)
        likelihood, home = args.likelihood, Path(".")
    output = Path(args.output or home / f"gaps_{config.split}.json")
    check_writable(output, "--output" if args.output else "the report")  # before the work
    x = prepare_split(dataset, config.split, likelihood)
    x = evaluation_subset(x, config.max_points)
    if args.model is not None:
        user = load_user_model(args.model, x, args.weights, device)
        trained = Trained(user.model, user.encoder, user.family,
                          TrainConfig(latent_dim=user.latent_dim), dataset.image_shape)  # fmt: skip
    held = args.run_dir if args.model is None and world.main else None
    with lock_directory(held) if held else contextlib.nullcontext():
        report = measure_gaps(trained, x.to(device), config, args.progress and world.main, world)
        distributed.finish(world)
        if world.main:
            report.to_json(output)
    if world.main:
        print(report.table())
        print(report.convergence())
        print(f"\nwrote {output}")


def _collapse(args: argparse.Namespace) -> None:
    from .collapse import run_collapse_study

    config = _config(CollapseConfig, args)
    run_dir = Path(args.run_dir or "runs/collapse")
    results = run_collapse_study(config, run_dir)
    _print_summary(run_dir, results, "\n## ")


def _download(args: argparse.Namespace) -> None:
    from ..data import default_data_dir, download_binarized_mnist, download_idx

    root = args.data_dir or default_data_dir()
    if args.dataset == "binarized-mnist":
        path = download_binarized_mnist(root)
    else:
        path = download_idx(args.dataset, root)
    print(f"{args.dataset} is in {path}")


@contextlib.contextmanager
def _plain_warnings() -> Iterator[None]:
    """Show warnings as one line each (``amortized: warning: ...``), not with the source
    line that raised them."""
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"amortized: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show


def _show_progress_lines() -> None:
    """The package's progress lines (resuming, phases, how data are read) on stderr, one
    line each; a library user sees them only by configuring ``logging``."""
    logger = logging.getLogger("amortized")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("amortized: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _Stderr(logging.StreamHandler):
    """Lines to ``sys.stderr`` as it is when each is written (not when made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _show_progress_lines()
    tune_allocator()
    commands = {
        "study": _study,
        "generalization": _generalization,
        "train": _train,
        "gap": _gap,
        "collapse": _collapse,
        "download": _download,
    }
    try:
        with _plain_warnings():
            commands[args.command](args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, DirectoryBusy,
            ValueError) as err:  # fmt: skip
        message = " ".join(str(err).split("\n"))  # one line, whatever the error quotes
        print(f"amortized {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written: name it and the cause
        where = f"{err.filename}: " if err.filename else ""
        print(f"amortized {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
