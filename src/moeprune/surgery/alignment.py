"""Applying hidden-unit permutations to experts' weights: the half of alignment that changes tensors.

The search for the permutations is `moeprune.methods.alignment`; its convention holds here: a
permutation `perm` of a member means *new unit j = old unit perm[j]*. Plans store one per member
(`plan.Group.perms`) and `apply_layer_plan` calls `permute_members` before the weighted sum.

Layouts (`arch.base.Adapter`): fused `gate_up_proj [E, 2I, H]` (gate rows then up rows) and
`down_proj [E, H, I]`; transposed `[E, H, 2I]` / `[E, I, H]` (Llama 4, GPT-OSS); interleaved gate/up
along 2I (GPT-OSS: gate at 0::2, up at 1::2), with `gate_up_proj_bias [E, 2I]` laid out the same.

Shape letters: E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch

from moeprune.arch import Adapter
from moeprune.errors import MoepruneError

# Per-expert tensors of the fused experts module and what permuting hidden units does to them.
GATE_UP, DOWN, GATE_UP_BIAS, DOWN_BIAS = "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"
UP, UP_BIAS = "up_proj", "up_proj_bias"  # non-gated experts (up -> act -> down): `up_proj [E, I, H]`


def gate_up_index(perm: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """[2I] index along the fused gate/up axis that applies `perm` [I] to gate and up alike."""
    I = perm.numel()
    if interleaved:  # gate unit j at 2j, up unit j at 2j + 1
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    return torch.cat([perm, perm + I])  # gate rows, then up rows


def _check_perm(perm, I: int) -> torch.Tensor:
    p = torch.as_tensor(perm, dtype=torch.long)
    if p.ndim != 1 or p.numel() != I or not torch.equal(p.sort().values, torch.arange(I)):
        raise MoepruneError(
            f"a hidden-unit permutation must reorder the expert's {I} hidden units 0..{I - 1} "
            f"(got {p.numel()} entries)"
        )
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
    unknown = set(tensors) - {GATE_UP, DOWN, GATE_UP_BIAS, DOWN_BIAS, UP, UP_BIAS}
    if unknown:
        raise MoepruneError(
            f"{adapter.family}: cannot permute hidden units of expert tensors {sorted(unknown)}; "
            "alignment knows gate_up_proj (or up_proj), down_proj and their biases"
        )
    p = _check_perm(perm, expert_width(adapter, tensors))
    fused = GATE_UP in tensors
    gu = gate_up_index(p, adapter.interleaved) if fused else p  # [2I], or [I] for up_proj alone
    t = tensors[GATE_UP if fused else UP]
    axis = 1 if adapter.transposed else 0  # of the 2I (I) axis within one expert: [2I, H] or [H, 2I]
    t[e] = t[e].index_select(axis, gu.to(t.device))
    t = tensors[DOWN]
    axis = 0 if adapter.transposed else 1  # of the I axis within one expert: [H, I] or [I, H]
    t[e] = t[e].index_select(axis, p.to(t.device))
    for name in (GATE_UP_BIAS, UP_BIAS):
        if name in tensors:
            b = tensors[name]
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
                raise MoepruneError(
                    f"layer {lp.layer}: the permutation of expert {e} has {len(q)} entries but "
                    f"the experts have {I} hidden units; the plan was made for another model"
                )
            if list(q) != list(range(I)):
                permute_expert_hidden(adapter, out, e, q)
    return out
