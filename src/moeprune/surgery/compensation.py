"""Write a fitted compensation into a compressed block: deltas on the kept experts' down projections
and on the novice vectors, and low-rank novices' factors (`moeprune.methods.compensation` fits them,
`moeprune.pipeline.compensate` gathers the data)."""

from __future__ import annotations

import torch
from torch import nn

from moeprune.arch import Adapter
from moeprune.arch.base import has_low_rank_novices
from moeprune.errors import MoepruneError


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


@torch.no_grad()
def make_low_rank_novices(adapter: Adapter, block: nn.Module, bias: torch.Tensor, up: torch.Tensor,
                          down: torch.Tensor) -> None:
    """novice_vectors += bias [N, D], and the novices become low-rank: novice i outputs
    `b_i + up[i] @ (down[i]ᵀ x)` (up, down [N, D, r]; buffers `novice_u`, `novice_v`)."""
    ex = adapter.experts(block)
    if has_low_rank_novices(ex):
        raise MoepruneError("this MoE block's novices are already low-rank; fit them once")
    add_to_novices(adapter, block, bias)
    v = ex.novice_vectors
    ex.register_buffer("novice_u", up.to(device=v.device, dtype=v.dtype).contiguous(), persistent=False)
    ex.register_buffer("novice_v", down.to(device=v.device, dtype=v.dtype).contiguous(), persistent=False)


@torch.no_grad()
def add_to_router(adapter: Adapter, block: nn.Module, delta: torch.Tensor) -> None:
    """Router weight rows += delta [R, H] (and its bias += delta[:, H] when delta is [R, H+1])."""
    router = adapter.router(block)
    W = router.weight
    H = W.shape[1]
    W.copy_((W.double() + delta[:, :H].to(W.device)).to(W.dtype))
    if delta.shape[1] > H:
        b = router.bias
        b.copy_((b.double() + delta[:, H].to(b.device)).to(b.dtype))
