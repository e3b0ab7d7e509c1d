"""Checks of method options, run when a method's config is built (before any statistics are read).

Every message has one form: "<method> option <name>=<value> is <what is wrong>; give <what works>".
The checks are written so NaN fails them (`not x > 0` rather than `x <= 0`), and bool, a subclass
of int in Python, is not taken for a count or a seed.
"""

from __future__ import annotations

import math

from moeprune.errors import MoepruneError

MAX_SEED = 2**31 - 1  # seeds reach numpy/scikit-learn (random_state < 2**32) after adding a layer index


def _bad(method: str, name: str, value, what: str, give: str) -> MoepruneError:
    return MoepruneError(f"{method} option {name}={value!r} is {what}; give {give}")


def one_of(method: str, name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise _bad(method, name, value, "not a known choice", f"one of {', '.join(allowed)}")


def flag(method: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise _bad(method, name, value, "not true or false", "true or false")


def integer(method: str, name: str, value, minimum: int, maximum: int | None = None) -> None:
    """An int in [minimum, maximum] (no upper bound when maximum is None)."""
    span = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(method, name, value, "not an integer", span)
    if value < minimum or (maximum is not None and value > maximum):
        raise _bad(method, name, value, "out of range", span)


def seed(method: str, name: str, value) -> None:
    integer(method, name, value, 0, MAX_SEED)


def number(method: str, name: str, value, *, minimum: float = 0.0, strict: bool = False) -> None:
    """A finite real number > minimum (strict) or >= minimum."""
    bound = f"{'>' if strict else '>='} {minimum:g}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(method, name, value, "not a finite number", f"a finite number {bound}")
    if not (value > minimum if strict else value >= minimum):
        raise _bad(method, name, value, "out of range", f"a number {bound}")
