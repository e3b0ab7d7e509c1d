"""Read-only access to the expert weights of a model, for methods that need more than statistics.

Methods stay pure: they never change the model. What they may read of an MoE layer is collected
here — each expert's weight views, every expert's raw output on given tokens (the probe), and the
block's output on given tokens with a candidate layer plan applied to a *copy* of the block. The
last one uses the family's own router and kernels, so NAEE-style reconstruction errors and learned
merge coefficients see exactly the routing the model would have after surgery, group limits and
renormalisation included, with no routing code re-implemented per family.

Shape letters: E experts, H hidden, n probe tokens.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeprune.arch import Adapter, ExpertWeights, get_adapter


class LayerAccess:
    """What a method may read of one MoE layer."""

    def __init__(self, adapter: Adapter, block: nn.Module, layer: int):
        self.adapter = adapter
        self.block = block
        self.layer = layer

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts

    def expert_weights(self, e: int) -> ExpertWeights:
        """Expert `e` as gate [I,H], up [I,H], down [H,I] (+ biases). Views: do not modify."""
        return self.adapter.expert_weights(self.block, e)

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """The fused expert tensors, expert axis first (read-only)."""
        return {k: v.detach() for k, v in self.adapter.expert_parameters(self.block).items()}

    @torch.no_grad()
    def expert_outputs(self, x: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """[E', n, H] raw (ungated) outputs of `experts` (default all) on tokens x [n, H]."""
        ids = list(range(self.num_experts)) if experts is None else list(experts)
        dtype = next(self.block.parameters()).dtype
        x = x.to(dtype)
        n = x.shape[0]
        rep = x.repeat(len(ids), 1)  # [E'*n, H]
        which = torch.tensor(ids).repeat_interleave(n)  # [E'*n]
        return self.adapter.expert_outputs(self.block, rep, which).view(len(ids), n, -1).float()

    @torch.no_grad()
    def block_output(self, x: torch.Tensor, layer_plan=None) -> torch.Tensor:
        """[n, H] the MoE block's output on x [n, H], after `layer_plan` if given (on a copy)."""
        from moeprune.surgery import apply_layer_plan

        block = self.block
        if layer_plan is not None:
            block = copy.deepcopy(self.block)
            apply_layer_plan(self.adapter, block, layer_plan)
        dtype = next(block.parameters()).dtype
        out = block(x.to(dtype)[None])  # blocks take [B, L, H]
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(x.shape[0], -1).float()


class ModelWeights:
    """Weight access for every MoE layer of an in-memory model (an out-of-core source can mimic it)."""

    def __init__(self, model: nn.Module):
        self.adapter = get_adapter(model.config)
        self._blocks = self.adapter.moe_blocks(model)

    def layers(self) -> list[int]:
        return sorted(self._blocks)

    def layer(self, i: int) -> LayerAccess:
        return LayerAccess(self.adapter, self._blocks[i], i)
