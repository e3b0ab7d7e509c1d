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

Convention: a permutation `perm` of a member means *new unit j = old unit perm[j]*. Plans store one
per member (`plan.Group.perms`, identity for the reference) and surgery applies them
(`permute_members`) before the weighted sum, so the alignment is part of the plan. Such plans hold
E·I integers per layer (Qwen3-30B-A3B: 128 × 768 per layer, about 30 MB of JSON for 48 layers).

Layouts (`arch.base.Adapter`): fused `gate_up_proj [E, 2I, H]` (gate rows then up rows) and
`down_proj [E, H, I]`; transposed `[E, H, 2I]` / `[E, I, H]` (Llama 4, GPT-OSS); interleaved gate/up
along 2I (GPT-OSS: gate at 0::2, up at 1::2), with `gate_up_proj_bias [E, 2I]` laid out the same.

Cost: the assignment is O(I³). It is instant for fine-grained experts (I of a few hundred to a few
thousand) and slow for very wide ones (Mixtral-8x7B, I = 14336: minutes per pair); methods offer
`align=false` for those.

Shape letters: E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from moeprune.arch import Adapter, ExpertWeights
from moeprune.errors import MoepruneError

# Per-expert tensors of the fused experts module and what permuting hidden units does to them.
GATE_UP, DOWN, GATE_UP_BIAS, DOWN_BIAS = "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"


def gate_up_index(perm: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """[2I] index along the fused gate/up axis that applies `perm` [I] to gate and up alike."""
    I = perm.numel()
    if interleaved:  # gate unit j at 2j, up unit j at 2j + 1
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    return torch.cat([perm, perm + I])  # gate rows, then up rows


def _check_perm(perm, I: int) -> torch.Tensor:
    p = torch.as_tensor(perm, dtype=torch.long)
    if p.ndim != 1 or p.numel() != I or not torch.equal(p.sort().values, torch.arange(I)):
        raise MoepruneError(f"a hidden-unit permutation must reorder the expert's {I} hidden units 0..{I - 1} "
                            f"(got {p.numel()} entries)")
    return p


def expert_width(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> int:
    """I, the hidden width of the experts in `tensors` (the fused experts tensors, expert axis first)."""
    down = tensors[DOWN]  # [E, H, I], or [E, I, H] when transposed
    return int(down.shape[1] if adapter.transposed else down.shape[2])


@torch.no_grad()
def permute_expert_hidden(adapter: Adapter, tensors: dict[str, torch.Tensor], e: int, perm) -> None:
    """Permute expert `e`'s hidden units in place: new unit j = old unit perm[j].

    `tensors` maps the experts module's tensor names (`gate_up_proj`, `down_proj`, and
    `gate_up_proj_bias`, `down_proj_bias` where present) to tensors with the expert axis first;
    they are modified in place, so pass copies of a model's parameters. The expert computes the
    same function afterwards (up to float rounding: here, exactly, since only order changes).
    """
    unknown = set(tensors) - {GATE_UP, DOWN, GATE_UP_BIAS, DOWN_BIAS}
    if unknown:
        raise MoepruneError(f"{adapter.family}: cannot permute hidden units of expert tensors {sorted(unknown)}; "
                            "alignment knows gate_up_proj, down_proj and their biases")
    p = _check_perm(perm, expert_width(adapter, tensors))
    gu = gate_up_index(p, adapter.interleaved)  # [2I]
    t = tensors[GATE_UP]
    axis = 1 if adapter.transposed else 0  # of the 2I axis within one expert: [2I, H] or [H, 2I]
    t[e] = t[e].index_select(axis, gu.to(t.device))
    t = tensors[DOWN]
    axis = 0 if adapter.transposed else 1  # of the I axis within one expert: [H, I] or [I, H]
    t[e] = t[e].index_select(axis, p.to(t.device))
    if GATE_UP_BIAS in tensors:
        b = tensors[GATE_UP_BIAS]
        b[e] = b[e][gu.to(b.device)]


@torch.no_grad()
def permute_members(adapter: Adapter, params: dict[str, torch.Tensor], lp) -> dict[str, torch.Tensor]:
    """Copies of a layer's expert tensors with every member of every aligned group of `lp` permuted.

    Called by surgery before the merge matrix is applied; identity permutations are skipped.
    """
    out = {name: p.detach().clone() for name, p in params.items()}
    I = expert_width(adapter, out)
    for g in lp.groups:
        for e, q in zip(g.members, g.perms or []):
            if len(q) != I:
                raise MoepruneError(f"layer {lp.layer}: the permutation of expert {e} has {len(q)} entries but "
                                    f"the experts have {I} hidden units; the plan was made for another model")
            if list(q) != list(range(I)):
                permute_expert_hidden(adapter, out, e, q)
    return out


def similarity(ref: ExpertWeights, other: ExpertWeights) -> torch.Tensor:
    """[I, I] float64: S[a, b] = similarity of reference unit a and the other expert's unit b."""
    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().cpu()

    g0, u0, d0 = f64(ref.gate), f64(ref.up), f64(ref.down)  # [I, H], [I, H], [H, I]
    g1, u1, d1 = f64(other.gate), f64(other.up), f64(other.down)
    S = g0 @ g1.T + u0 @ u1.T + d0.T @ d1  # [I, I]
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

    `access` is a `methods.access.LayerAccess` (anything with `expert_weights(e)`).
    """
    ref = access.expert_weights(reference)
    I = ref.gate.shape[0]
    return [list(range(I)) if e == reference else match_hidden(ref, access.expert_weights(e)) for e in members]
