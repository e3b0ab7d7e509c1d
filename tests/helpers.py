"""Helpers shared by the tests (imported as `helpers`; fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from moeprune.arch import get_adapter
from moeprune.arch.tiny import TINY_FAMILIES
from moeprune.observe import model_description, observe
from moeprune.plan import Group, LayerPlan, Plan

# The config field holding the routed-expert count, per family (DESIGN.md's table, written out here
# rather than read from the adapters, so that the tests check the adapters against it).
COUNT_FIELD = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
    "glm4_moe": "n_routed_experts",
    "phimoe": "num_local_experts",
    "gpt_oss": "num_local_experts",
    "ernie4_5_moe": "moe_num_experts",
    "llama4_text": "num_local_experts",
}

# Standard-library modules concatenated into the calibration text (deterministic on one interpreter).
CALIB_MODULES = ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py")

SEED = 0


def calibration_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in CALIB_MODULES)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `path` (plus directories as empty entries)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def manual_plan(model, keep: list[int] | None = None,
                groups: list[tuple[list[int], list[float]]] | None = None, method: str = "manual") -> Plan:
    """A plan applying the same `keep` list (singletons) or `groups` to every MoE layer of `model`."""
    adapter = get_adapter(model.config)
    desc = model_description(model, adapter)
    E = desc["num_experts"]
    if groups is None:
        groups = [([e], [1.0]) for e in (range(E) if keep is None else keep)]
    layers = [LayerPlan(layer=i, num_experts_in=E, groups=[Group(list(m), list(c)) for m, c in groups])
              for i in desc["moe_layers"]]
    return Plan(method=method, layers=layers, model=desc)


def token_ids(n: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1024, (n, length), generator=g)


def block_output(out) -> torch.Tensor:
    """The hidden states of an MoE block's output (GPT-OSS and Llama 4 return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


ALL_FAMILIES = pytest.mark.parametrize("family", TINY_FAMILIES)


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors shards (one file or an index of shards)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        if shard.name != "moeprune_novices.safetensors":
            tensors.update(load_file(str(shard)))
    return tensors


def saved_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor of a checkpoint directory, from the shard headers."""
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        if shard.name != "moeprune_novices.safetensors":
            with safe_open(str(shard), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def observed(model, n_tokens: int = 128):
    """Statistics of `model` over `n_tokens` random tokens (every token probed)."""
    return observe(model, token_ids(4, n_tokens // 4), probe_size=n_tokens)
