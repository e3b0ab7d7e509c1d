"""The only code that changes weights: apply a validated Plan to a model in memory.

Every plan is the same linear map per layer: a merge matrix M [E_out, E_in] whose row j holds
output expert j's coefficients. Expert tensors (fused gate/up, down, and their biases: all have E
on axis 0, whatever the layout) become M @ W; router tensors (weights, biases, correction biases)
use the same matrix (`average`) or its 0/1 support (`sum`) along their expert axis. A pure pruning
plan takes the exact index-select path, so kept experts are bit-identical. Groups with
permutations (`Group.perms`, UNCURL / M-SMoE alignment) have their members' hidden units permuted
first (`moeprune.methods.alignment.permute_members`, layout-aware), so M @ W averages aligned units. Layers
with novices (MoNE) keep their router whole and hand over to `moeprune.surgery.novices`.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.arch import Adapter, get_adapter
from moeprune.arch.base import with_fixed_rows
from moeprune.errors import MoepruneError
from moeprune.plan import LayerPlan, Plan

__all__ = ["apply_layer_plan", "apply_plan", "merge_matrix"]


def merge_matrix(lp: LayerPlan) -> torch.Tensor:
    """[E_out, E_in] float64: row j holds output expert j's merge coefficients."""
    M = torch.zeros(lp.num_experts_out, lp.num_experts_in, dtype=torch.float64)
    for j, g in enumerate(lp.groups):
        for e, c in zip(g.members, g.coeffs):
            M[j, e] = c
    return M


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter or buffer for a new tensor, keeping its kind and grad flag."""
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value.contiguous()


def _combine(tensor: torch.Tensor, M: torch.Tensor, axis: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Apply the merge matrix along `axis`: index-select when `keep` is given, else M @ tensor.

    Entries past the E_in routed experts on that axis (zero-compute experts, shared experts' router
    rows) are kept as they are, after the new ones (`with_fixed_rows`).
    """
    M, keep = with_fixed_rows(M, keep, tensor.shape[axis])
    if keep is not None:
        return tensor.index_select(axis, keep.to(tensor.device))
    moved = tensor.movedim(axis, 0)  # [E_in, ...]
    merged = torch.tensordot(M.to(moved.device), moved.double(), dims=([1], [0]))  # [E_out, ...]
    return merged.to(tensor.dtype).movedim(0, axis)


@torch.no_grad()
def apply_layer_plan(adapter: Adapter, block: nn.Module, lp: LayerPlan,
                     novice_vectors: torch.Tensor | None = None) -> None:
    """Rewrite one MoE block's experts and router according to `lp`.

    A layer with novices (MoNE) keeps its router whole and gets its novices, `novice_vectors [n, H]`
    in the order of `lp.novices`, from `moeprune.methods.mone.novice_vectors`.
    """
    if lp.novices:
        from moeprune.surgery.novices import apply_novice_layer

        if adapter.novice_refusal:
            raise MoepruneError(f"{adapter.family}: {adapter.novice_refusal}")

        apply_novice_layer(adapter, block, lp, novice_vectors)
        return
    M = merge_matrix(lp)  # [E_out, E_in]
    keep = torch.tensor([g.members[0] for g in lp.groups]) if lp.is_pruning else None
    router_M = M if lp.router_merge == "average" else (M != 0).double()
    adapter.remap_routing(block, M)  # before the tensors change: it may read the old router
    params = adapter.expert_parameters(block)
    if any(g.perms is not None for g in lp.groups):  # aligned merge: permute members' hidden units first
        from moeprune.surgery.alignment import permute_members

        params = permute_members(adapter, params, lp)
    for name, p in params.items():
        adapter.set_expert_tensor(block, name, _combine(p, M, 0, keep))
    for owner, name, axis in adapter.router_expert_tensors(block):
        # E rows, or E + fixed rows (a skip class, zero-compute experts), which `_combine` carries over
        _replace(owner, name, _combine(getattr(owner, name), router_M, axis, keep))
    adapter.set_block_num_experts(block, lp.num_experts_in, lp.num_experts_out)
    adapter.after_layer_plan(block, lp)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, *, stats=None) -> nn.Module:
    """Apply `plan` to `model` in place and return it. The plan is validated against the model first.

    A plan with novices (MoNE) needs the Stats it was made from (`stats`) for the novice vectors,
    unless it was made with `novice=false`.
    """
    from moeprune.methods.mone import novice_vectors
    from moeprune.surgery.novices import refuse_novice_model

    refuse_novice_model(model)
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    facts = {
        "num_experts": adapter.num_experts, "top_k": adapter.top_k, "n_group": adapter.n_group,
        "min_experts_per_group": adapter.min_experts_per_group, "moe_layers": sorted(blocks),
    }
    plan.validate(facts)  # every MoE layer listed once, the novice checks included
    vectors = novice_vectors(plan, stats)  # {} without novices
    E_in = adapter.num_experts
    for lp in plan.layers:
        apply_layer_plan(adapter, blocks[lp.layer], lp, vectors.get(lp.layer))
    if not any(lp.novices for lp in plan.layers):  # with novices the routers keep all E rows: config stays E
        adapter.set_config_num_experts(model, E_in, plan.num_experts_out)
    if plan.flatten_groups:
        adapter.flatten_groups(model)
    return model
