"""What a method may read of a model's expert weights: protocols, implemented by the pipeline.

Methods stay pure: they read statistics and these views and return a Plan; they never change the
model and import no surgery. `moeprune.pipeline.access` implements the protocols for a model in
memory (`ModelWeights`), and `pipeline.run` for checkpoints read layer by layer.

Evaluating a *candidate* plan (the block's output after a layer plan, a merged block with
learnable coefficients, routed sums of pruned subsets) needs the family's own router and kernels
on a copy of the block; that is a capability the access offers, not code a method imports.

Shape letters: E experts in, R experts out, H hidden, n probe tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from moeprune.arch import Adapter, ExpertWeights
from moeprune.plan import LayerPlan


class NotExact(Exception):
    """A routed lookup cannot reproduce the block on these tokens (the method falls back)."""


class MergedCandidate(Protocol):
    """A copy of a block whose expert and router tensors are `M @ W`, differentiable in M."""

    def set(self, M: torch.Tensor) -> None:
        """Install merged tensors for the merge matrix M [R, E] (float32, may require grad)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[n, H] the block output on x [n, H] with the installed tensors (float32)."""


class LayerWeights(Protocol):
    """What a method may read of one MoE layer."""

    adapter: Adapter
    layer: int

    @property
    def num_experts(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype:
        """The block's parameter dtype."""

    def expert_weights(self, e: int) -> ExpertWeights:
        """Expert `e` as gate [I,H], up [I,H], down [H,I] (+ biases). Views: do not modify."""

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """The fused expert tensors, expert axis first (read-only)."""

    def expert_outputs(self, x: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """[E', n, D] float32 raw (ungated) outputs of `experts` (default all) on block inputs x [n, H]
        (D = H unless the experts run in a latent space: `Adapter.expert_dim`)."""

    def block_output(self, x: torch.Tensor, layer_plan: LayerPlan | None = None,
                     novice_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """[n, H] float32 the MoE block's output on x [n, H], after `layer_plan` if given (on a copy; a plan
        with novices needs their vectors [N, D])."""

    def merged_block(self, num_out: int, router_merge: str = "average",
                     aligned: LayerPlan | None = None) -> MergedCandidate:
        """A copy of the block with `num_out` merged experts (members permuted as `aligned`'s perms say)."""

    def routed_lookup(self, x: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
        """subset -> [n, H] the routed sum of the block pruned to subset on x [n, H]; raises NotExact."""


class WeightAccess(Protocol):
    """Weight access for every MoE layer of one model."""

    adapter: Adapter

    def layers(self) -> list[int]: ...

    def layer(self, i: int) -> LayerWeights: ...
