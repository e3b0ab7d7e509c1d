"""Method options are validated when the config is built: one MoepruneError line saying what to give."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.methods import METHODS, get_method

# ---- 5. method options ---------------------------------------------------------------------------------

def _fields():
    for name, spec in sorted(METHODS.items()):
        hints = typing.get_type_hints(spec.config)
        for f in dataclasses.fields(spec.config):
            yield name, f.name, hints[f.name]


def _bad_values(kind):
    if kind is bool:
        return ["yes", 1]
    if kind is str:
        return ["bogus", 3]
    if kind is int:
        return [-1, 2.5, True, "3"]
    if kind is float:
        return [-1.0, math.nan, math.inf, "0.1"]
    raise AssertionError(f"no bad values for option type {kind}")


@pytest.mark.parametrize("method,option,kind", list(_fields()))
def test_every_method_option_is_checked_when_the_config_is_built(method, option, kind):
    """Each option of every registered method refuses values of the wrong type, negative and NaN ones."""
    spec = get_method(method)
    spec.default_config()  # the defaults pass
    for value in _bad_values(kind):
        with pytest.raises(MoepruneError) as info:
            spec.default_config(**{option: value})
        message = str(info.value)
        assert message.startswith(f"{method} option {option}={value!r} is "), message
        assert "; give " in message, message


@pytest.mark.parametrize("method,options,fragment", [
    ("uncurl", {"clustering": "bogus"}, "one of spectral, spectral-plain, kmeans"),
    ("naee", {"max_exhaustive": -1}, "an integer >= 0"),
    ("naee", {"tolerance": -1e-3}, "a number >= 0"),
    ("dek", {"learn_lr": math.nan}, "a finite number > 0"),
    ("dek", {"learn_lr": 0.0}, "a number > 0"),
    ("dek", {"surrogate_tokens": 1}, "an integer >= 2"),
    ("hc_smoe", {"learn_steps": -5}, "an integer >= 0"),
    ("random", {"seed": -1}, r"an integer in \[0, "),
    ("uncurl", {"seed": 2**40}, r"an integer in \[0, "),
    ("mone", {"scope": "everything"}, "one of layer, global"),
])
def test_option_messages_say_what_to_give(method, options, fragment):
    with pytest.raises(MoepruneError, match=fragment):
        get_method(method).default_config(**options)


def test_valid_edge_options_pass():
    get_method("naee").default_config(max_exhaustive=0, tolerance=0.0, seed=0)
    get_method("dek").default_config(learn_steps=0, learn_lr=1e-6, surrogate_tokens=2)
    get_method("naee").default_config(tolerance=0)  # an int where a float is expected is a number


def test_bad_option_via_cli_fails_before_calibration(tmp_path, capsys, checkpoint):
    src = checkpoint("mixtral")
    # no --calib: the option check must come before the missing-calibration check
    assert main(["prune", str(src), "--method", "naee", "--out", str(tmp_path / "out"), "--experts", "4",
                 "-o", "max_exhaustive=-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "naee option max_exhaustive=-1 is out of range" in lines[0], lines
