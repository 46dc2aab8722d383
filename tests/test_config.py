"""Settings with a fixed few choices declare them once, as Literal types beside the field."""

from __future__ import annotations

import typing
from dataclasses import fields, replace

import pytest

from amortized.config import (
    CollapseConfig,
    ConfigError,
    GapConfig,
    StudyConfig,
    TrainConfig,
    check_choices,
    choices,
    from_dict,
)
from amortized.inference.iterative import STARTS
from amortized.inference.refine import METHODS
from amortized.train import validate


def _literal_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in fields(cls) if typing.get_origin(hints[f.name]) is typing.Literal]


@pytest.mark.parametrize("cls", [TrainConfig, GapConfig, CollapseConfig])
def test_every_choice_is_checked_where_read_and_where_validated(cls):
    names = _literal_fields(cls)
    assert names  # each config has some
    for name in names:
        allowed = choices(cls, name)
        assert getattr(cls(), name) in allowed  # the default is one of them
        for value in allowed:  # each reads back
            assert getattr(from_dict(cls, {name: value}), name) == value
        with pytest.raises(ConfigError, match=rf"^{name} must be one of .*got 'nope'$"):
            from_dict(cls, {name: "nope"})
        with pytest.raises(ConfigError, match=rf"^{name} must be one of"):
            check_choices(replace(cls(), **{name: "nope"}))


def test_nested_configs_name_the_path_and_the_training_check_sees_choices():
    study = StudyConfig(gap=replace(GapConfig(), refine_method="newton"))
    with pytest.raises(ConfigError, match=r"^gap.refine_method must be one of"):
        check_choices(study)
    with pytest.raises(ConfigError, match="kl_schedule must be one of"):
        validate(TrainConfig(kl_schedule="cubic"))


def test_the_library_takes_its_choices_from_the_same_declaration():
    assert METHODS == choices(GapConfig, "refine_method") == choices(TrainConfig, "svi_method")
    assert STARTS == choices(TrainConfig, "iterative_start")
    with pytest.raises(TypeError, match="no fixed choices"):
        choices(TrainConfig, "family")  # a registry, not a Literal
