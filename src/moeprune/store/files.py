"""Facts read straight from a model directory's files, without transformers."""

from __future__ import annotations

import json
from pathlib import Path

from moeprune.errors import MoepruneError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files (*.safetensors, *.bin, novices included) of a model directory."""
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def read_config_dict(path: str | Path) -> dict:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise MoepruneError(f"{p} is not a model directory: it has no config.json")
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MoepruneError(f"{p}/config.json is not valid JSON ({e.msg})")
