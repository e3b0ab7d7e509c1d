"""The one place where numeric options are checked, for every command and API entry point.

Each option has a rule (integer or real, smallest allowed value); `check_settings(**values)`
refuses the first value that breaks its rule with one line naming the flag. NaN and infinities
are refused for every real option, since they pass comparisons like `x <= 0` unnoticed.
"""

from __future__ import annotations

import math

from moeprune.errors import MoepruneError

# option -> (integer?, smallest allowed value, what it is)
RULES: dict[str, tuple[bool, float, str]] = {
    "samples": (True, 1, "calibration sequences"),
    "seq_len": (True, 2, "tokens per sequence"),
    "batch_size": (True, 1, "sequences per forward pass"),
    "probe_size": (True, 1, "probe tokens kept per layer"),
    "seed": (True, 0, "the random seed"),
    "hidden_memory": (False, 0, "GiB of hidden states kept in memory"),
    "task_items": (True, 1, "items per built task"),
    "limit": (True, 1, "items per task"),
    "max_tokens": (True, 1, "tokens scored per text"),
    "knee_threshold": (False, 0, "the relative quality drop that marks the knee"),
    "surrogate_tokens": (True, 2, "Gaussian input rows"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(**values) -> None:
    """Refuse any value outside its rule in `RULES`; None means "not given" and passes."""
    for name, value in values.items():
        if value is None:
            continue
        integer, low, what = RULES[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MoepruneError(f"{flag(name)} {value!r} is not a number: give {what}")
        if not math.isfinite(value):
            raise MoepruneError(f"{flag(name)} {value} is not a finite number: give {what}")
        if integer and value != int(value):
            raise MoepruneError(f"{flag(name)} {value} is not a whole number: give {what}")
        if value < low:
            raise MoepruneError(f"{flag(name)} {value} is below {low:g}: give {what} (at least {low:g})")


def check_seq_len(seq_len: int, config, what: str = "--seq-len") -> None:
    """Refuse sequences longer than the model's position embeddings (they would index past the table)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise MoepruneError(f"{what} {seq_len} is longer than the model's max_position_embeddings ({limit}); "
                            f"give {what} {limit} or less")


def check_ratio(ratio: float | None) -> None:
    if ratio is not None and not math.isfinite(ratio):
        raise MoepruneError(f"--ratio {ratio} is not a finite number: give the fraction of experts to remove")
