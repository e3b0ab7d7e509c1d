"""Streaming output: one safetensors shard per decoder layer, in the checkpoint's original key layout.

Each layer's in-memory (fused) tensors go back to on-disk names through transformers' own reverse
conversion (`revert_weight_conversion`, what `save_pretrained` uses; reached via `moeprune.compat`), so
the output has the per-expert names stock transformers and vLLM load (`experts.N.gate_proj.weight`, or
Mixtral's `block_sparse_moe.experts.N.w1.weight`), renumbered over the surviving experts. Tensors outside
the decoder layers are copied raw with their on-disk names. `model.safetensors.index.json` is
written last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moeprune.compat import on_disk_names
from moeprune.store.files import INDEX_FILE


class ShardWriter:
    """Writes `num_shards` shards one call at a time, then the index."""

    def __init__(self, directory: Path, num_shards: int):
        self.directory = Path(directory)
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self._written += 1
        if self._written > self.num_shards:
            raise RuntimeError(f"more than the {self.num_shards} announced shards")
        name = f"model-{self._written:05d}-of-{self.num_shards:05d}.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            if k in self.weight_map:
                raise RuntimeError(f"tensor {k} written twice")
            self.weight_map[k] = name
            self.total_size += v.numel() * v.element_size()

    def finish(self) -> None:
        if self._written != self.num_shards:
            raise RuntimeError(f"wrote {self._written} of {self.num_shards} shards")
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def layer_on_disk(model: nn.Module, layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Decoder layer `layer` (dotted name `prefix`, e.g. `model.layers.3.`) as on-disk name -> tensor."""
    state = {prefix + k: v for k, v in layer.state_dict().items()}
    return on_disk_names(model, state)
