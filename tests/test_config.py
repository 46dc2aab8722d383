"""Settings declare their choices (Literal types) and bounds once, beside the field."""

from __future__ import annotations

import math
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
    check_fields,
    choices,
    from_dict,
)
from amortized.inference.iterative import STARTS
from amortized.inference.refine import METHODS
from amortized.train import validate


def _literal_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in fields(cls) if typing.get_origin(hints[f.name]) is typing.Literal]


@pytest.mark.parametrize("cls", [TrainConfig, GapConfig])
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


def _bounded_fields(cls):
    return [f for f in fields(cls) if {"ge", "gt"} & set(f.metadata)]


@pytest.mark.parametrize("cls", [TrainConfig, GapConfig, StudyConfig, CollapseConfig])
def test_every_bound_is_declared_beside_its_field_and_checked(cls):
    bounded = _bounded_fields(cls)
    assert bounded  # each config has some
    check_fields(cls())  # the defaults lie within them
    for f in bounded:
        limit = f.metadata.get("ge", f.metadata.get("gt"))
        below = limit - 1 if "ge" in f.metadata else limit
        default = getattr(cls(), f.name)
        if isinstance(default, float):
            bad_values = [float(below), math.nan, math.inf if "gt" in f.metadata else -math.inf]
        else:
            bad_values = [int(below)]
        for bad in bad_values:
            value = (bad,) if isinstance(default, tuple) else bad
            with pytest.raises(ConfigError, match=rf"^{f.name} must be .*, got "):
                check_fields(replace(cls(), **{f.name: value}))
        at_limit = limit + (1 if "gt" in f.metadata else 0)
        value = (type(limit)(at_limit),) if isinstance(default, tuple) else type(default)(at_limit)
        check_fields(replace(cls(), **{f.name: value}))  # the bound itself is allowed


def test_nested_bounds_name_their_path_and_nested_defaults_are_the_parent_s():
    with pytest.raises(ConfigError, match=r"^gap.iwae_k must be >= 2 \(its error needs two"):
        check_fields(replace(StudyConfig(), gap=replace(StudyConfig().gap, iwae_k=1)))
    study = from_dict(StudyConfig, {"gap": {"iwae_k": 500}})
    assert study.gap.iwae_k == 500
    assert study.gap.local_steps == StudyConfig().gap.local_steps != GapConfig().local_steps
