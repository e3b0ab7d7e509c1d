"""Permutation alignment of experts' hidden units, for merging experts in weight space.

A SwiGLU expert `down(act(gate x) * up x)` computes the same function whatever order its `I` hidden
units are in: permuting the rows of gate and up, the columns of down, and the gate/up biases by the
same permutation changes the weights but not the output. Two experts trained separately have no
reason to order their units alike, so before averaging them (UNCURL, arXiv 2409.01483, step 3;
M-SMoE, arXiv 2310.01334) each member is permuted to match a reference expert.

The match is a Hungarian assignment (`scipy.optimize.linear_sum_assignment`, maximising) over

    S = W_gate,ref · W_gateᵀ + W_up,ref · W_upᵀ + W_down,refᵀ · W_down          [I, I]

S[a, b] is how much reference unit `a` looks like the member's unit `b`, through its input weights
(gate, up) and its output weights (down). Reading taken where the papers say nothing: where the
family has gate/up biases (GPT-OSS) they count as one more input column, so S also gets
`b_gate,ref b_gateᵀ + b_up,ref b_upᵀ`; down biases are per output, not per unit, and play no part.

Used by UNCURL and M-SMoE (on by default, as in their papers) and offered to DEK and HC-SMoE as
`align=true` (their papers merge unaligned, the default there); every method names the option `align`
and aligns each merged group to one of its members, `reference_member` (`group_permutations`).

Convention: a permutation `perm` of a member means *new unit j = old unit perm[j]*. Plans store one
per member (`plan.Group.perms`, identity for the reference) and surgery applies them before the
weighted sum (`moeprune.surgery.alignment`), so the alignment is part of the plan. Such plans hold
E·I integers per layer (Qwen3-30B-A3B: 128 × 768 per layer, about 30 MB of JSON for 48 layers).

Cost: the assignment is O(I³). It is instant for fine-grained experts (I of a few hundred to a few
thousand) and slow for very wide ones (Mixtral-8x7B, I = 14336: minutes per pair); methods offer
`align=false` for those.

Shape letters: E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from moeprune.arch import ExpertWeights


def similarity(ref: ExpertWeights, other: ExpertWeights) -> torch.Tensor:
    """[I, I] float64: S[a, b] = similarity of reference unit a and the other expert's unit b."""
    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().cpu()

    u0, d0 = f64(ref.up), f64(ref.down)  # [I, H], [H, I]
    u1, d1 = f64(other.up), f64(other.down)
    S = u0 @ u1.T + d0.T @ d1  # [I, I]
    if ref.gate is not None and other.gate is not None:  # non-gated experts (up -> act -> down) have none
        S += f64(ref.gate) @ f64(other.gate).T
    for b0, b1 in ((ref.gate_bias, other.gate_bias), (ref.up_bias, other.up_bias)):
        if b0 is not None and b1 is not None:
            S += f64(b0)[:, None] * f64(b1)[None, :]
    return S


def match_hidden(ref: ExpertWeights, other: ExpertWeights) -> list[int]:
    """The permutation of `other`'s hidden units that best matches `ref`'s (Hungarian, maximising S)."""
    S = similarity(ref, other)
    rows, cols = linear_sum_assignment(S.numpy(), maximize=True)
    perm = [0] * len(rows)
    for a, b in zip(rows.tolist(), cols.tolist()):
        perm[a] = b  # new unit a (matching reference unit a) = old unit b
    return perm


def align_members(access, members: list[int], reference: int) -> list[list[int]]:
    """One permutation per member aligning it to `reference` (the identity for the reference itself).

    `access` is a `methods.access.LayerWeights` (anything with `expert_weights(e)`).
    """
    ref = access.expert_weights(reference)
    I = ref.up.shape[0]
    return [
        list(range(I)) if e == reference else match_hidden(ref, access.expert_weights(e)) for e in members
    ]


def reference_member(members: list[int], counts) -> int:
    """The member a group is aligned to: the most routed (`counts` [E]; ties: the lowest id).

    Under frequency coefficients that is the group's highest-coefficient member; with no routing
    counts (uncalibrated plans) it is the lowest id.
    """
    return min(members, key=lambda e: (-float(counts[e]), e))


def group_permutations(
    access, groups: list[list[int]], counts
) -> tuple[list[list[list[int]] | None], list[int]]:
    """Per group, one permutation per member aligning it to `reference_member` (None for singletons),
    and each group's reference (as `Group.perms`; `access` as in `align_members`)."""
    refs = [reference_member(g, counts) for g in groups]
    perms = [align_members(access, g, ref) if len(g) > 1 else None for g, ref in zip(groups, refs)]
    return perms, refs
