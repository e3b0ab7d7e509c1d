"""The one place where numeric options are checked, for every command and API entry point.

Each option has a rule (integer or real, smallest allowed value); `check_settings(**values)`
refuses the first value that breaks its rule with one line naming the flag. NaN and infinities
are refused for every real option, since they pass comparisons like `x <= 0` unnoticed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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


# ---- requests: what a driver is asked to do, passed whole to the pipeline -------------------------
@dataclass(frozen=True)
class CalibrationRequest:
    """Which text calibrates, how it is cut into sequences, and how many probe tokens each layer keeps."""

    text: str | None = (
        None  # a file (.txt/.jsonl/.json), a directory of them, or None for weight-only methods
    )
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    probe_size: int = 512
    field: str | None = None
    template: str | None = None
    tokenizer: str | None = None  # default: the model's own

    def __post_init__(self):
        check_settings(samples=self.samples, seq_len=self.seq_len, seed=self.seed, probe_size=self.probe_size)


@dataclass(frozen=True)
class BudgetRequest:
    """How many experts each MoE layer keeps: a fraction removed (`ratio`) or a count (`experts`)."""

    ratio: float | None = None
    experts: int | None = None
    flatten_groups: bool = False

    def __post_init__(self):
        check_ratio(self.ratio)


@dataclass(frozen=True)
class OutputRequest:
    """Where results go; `force` replaces only an earlier moeprune output."""

    path: str | Path
    force: bool = False
    command: str | None = None  # recorded in the model card
    stats_path: str | Path | None = None  # also save the statistics here


@dataclass(frozen=True)
class RuntimeRequest:
    """How the work runs: device, batch size, which weight source, where spilled hidden states go."""

    device: str = "cpu"
    batch_size: int = 8
    in_memory: bool | None = None  # None: layer by layer when the checkpoint has safetensors weights
    sequential: bool = False
    offload_dir: str | Path | None = None
    hidden_memory: float = 2.0  # GiB of hidden states kept in memory before spilling to offload_dir
    progress: bool = True

    def __post_init__(self):
        check_settings(batch_size=self.batch_size, hidden_memory=self.hidden_memory)
        if self.sequential and self.in_memory:
            raise MoepruneError("--sequential works layer by layer; drop --in-memory")

    @property
    def hidden_budget(self) -> int:
        """Bytes of hidden states kept in memory."""
        return int(self.hidden_memory * 1024**3)
