"""Write a fitted compensation into a compressed block: deltas on the kept experts' down projections
and on the novice vectors (`moeprune.methods.compensation` fits them, `moeprune.pipeline.compensate`
gathers the data)."""

from __future__ import annotations

import torch
from torch import nn

from moeprune.arch import Adapter


@torch.no_grad()
def add_to_down(adapter: Adapter, block: nn.Module, delta: torch.Tensor) -> None:
    """down_proj of kept expert s += delta[s]; delta [R, D, I], whatever the stored layout."""
    ex = adapter.experts(block)
    down = ex.down_proj  # [R, D, I], or [R, I, D] when transposed
    d = delta.transpose(1, 2) if adapter.transposed else delta
    adapter.set_expert_tensor(block, "down_proj", (down.double() + d.to(down.device)).to(down.dtype))


@torch.no_grad()
def add_to_novices(adapter: Adapter, block: nn.Module, delta: torch.Tensor) -> None:
    """novice_vectors += delta [N, D] (a MoNE layer's constant outputs)."""
    ex = adapter.experts(block)
    v = ex.novice_vectors
    ex.register_buffer("novice_vectors", (v.double() + delta.to(v.device)).to(v.dtype), persistent=False)
