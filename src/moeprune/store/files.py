"""Facts read straight from a model directory's files, without transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

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


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(path: Path) -> dict[str, str]:
    """On-disk tensor name -> shard file name, from the index or the single safetensors file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise MoepruneError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})")
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise MoepruneError(f"{path} has no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}); layer-by-layer "
                        "loading reads safetensors only: convert the checkpoint, or use --in-memory")


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
}


def checkpoint_dtype(config, dtype, path: Path | None = None) -> torch.dtype:
    """What `from_pretrained(dtype="auto")` picks: the config's dtype, else the first float tensor's on
    disk."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    if isinstance(found, torch.dtype):
        return found
    if path is not None:
        files = sorted(path.glob("*.safetensors"))
        if files:
            with safe_open(str(files[0]), framework="pt") as f:
                for k in f.keys():
                    on_disk = SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype())
                    if on_disk is not None:
                        return on_disk
    return torch.float32
