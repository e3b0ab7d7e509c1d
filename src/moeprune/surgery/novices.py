"""Novices (MoNE) in memory: shrink a block's experts to the kept ones, attach the novices, detach them.

A novice layer keeps its router exactly as it was (all E rows, same top-k, same gate
normalisation) while its experts tensors hold only the E_kept surviving experts. Two
non-persistent buffers on the experts module carry the rest:

- `expert_map [E]` (int64): router id -> slot; slots `< E_kept` are rows of the shrunken experts
  tensors, slot `E_kept + n` is novice `n`;
- `novice_vectors [n, H]`: one constant vector per novice;
- optionally `novice_u`, `novice_v [n, H, r]`: low-rank novices (`b + U Vᵀ x`, fitted by compensation).

What runs them is the adapter's (`Adapter.install_novice_runtime`): for the experts classes that
transformers dispatches through `ALL_EXPERTS_FUNCTIONS`, a registered experts implementation that
sends the kept (token, expert) pairs through the implementation the model used before, on remapped
ids, one pair per row, and adds `g_i(x) * novice_i` for the novice pairs; Llama 4, whose experts run
densely on a score-scaled input, has its own variant (`moeprune.arch.families.Llama4Text`). Both
survive `copy.deepcopy`. The novice vectors come from `moeprune.methods.mone.novice_vectors`; the
on-disk format is `moeprune.store.novices`.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.arch import Adapter, get_adapter
from moeprune.arch.base import EXPERT_COUNT_ATTRS, is_novice_experts, novice_slots, router_keep
from moeprune.errors import MoepruneError

__all__ = ["apply_novice_layer", "attach_novices", "detach_novices", "has_novices", "is_novice_experts",
           "novice_blocks", "novice_refusal", "novice_router_names", "novice_slots", "reattach_novices",
           "refuse_novice_model"]


def novice_blocks(model: nn.Module, adapter: Adapter | None = None) -> dict[int, nn.Module]:
    """Layer index -> MoE block, for the blocks whose experts carry novices."""
    adapter = adapter or get_adapter(model.config)
    return {i: b for i, b in adapter.moe_blocks(model).items() if is_novice_experts(adapter.experts(b))}


def has_novices(model: nn.Module) -> bool:
    try:
        return bool(novice_blocks(model))
    except MoepruneError:
        return False


def novice_refusal(where: str, action: str) -> MoepruneError:
    """The error for a model with novices given where moeprune needs experts that match their router."""
    return MoepruneError(f"{where} a MoNE model with novices, which moeprune cannot {action}: start from "
                         "the original model, or make a stock copy first with "
                         "`moeprune export-stock PATH --out DIR`")


def refuse_novice_model(model: nn.Module, action: str = "prune") -> None:
    """Refuse to observe or prune an in-memory model that already has novices."""
    if has_novices(model):
        raise novice_refusal("this model is", action)


def attach_novices(adapter: Adapter, block: nn.Module, expert_map: torch.Tensor,
                   vectors: torch.Tensor, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Give a block whose experts tensors already hold only the kept experts its routing map and novices.

    The router and every cached count outside the experts module stay at E; the experts' cached
    counts become E_kept, which is what their kernels index with. The adapter's novice runtime
    is installed (see `Adapter.install_novice_runtime` for what it changes on the config).
    `low_rank` (U, V [n, H, r]) makes the novices low-rank.
    """
    ex = adapter.experts(block)
    if is_novice_experts(ex):
        raise MoepruneError("this MoE block already has novices")
    kept_count = ex.down_proj.shape[0]
    E = expert_map.numel()
    if vectors.shape[0] != E - kept_count:
        raise MoepruneError(f"{vectors.shape[0]} novice vectors for {E - kept_count} novice slots")
    device, dtype = ex.down_proj.device, ex.down_proj.dtype
    ex.register_buffer("expert_map", expert_map.to(device=device, dtype=torch.long), persistent=False)
    ex.register_buffer("novice_vectors", vectors.to(device=device, dtype=dtype), persistent=False)
    if low_rank is not None:
        up, down = low_rank
        if up.shape != down.shape or up.shape[:2] != vectors.shape:
            raise MoepruneError(f"low-rank novice factors {tuple(up.shape)}, {tuple(down.shape)} do not "
                                f"match {tuple(vectors.shape)} novice vectors")
        ex.register_buffer("novice_u", up.to(device=device, dtype=dtype), persistent=False)
        ex.register_buffer("novice_v", down.to(device=device, dtype=dtype), persistent=False)
    for attr in EXPERT_COUNT_ATTRS:
        value = getattr(ex, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(ex, attr, kept_count)
    adapter.install_novice_runtime(block)


@torch.no_grad()
def apply_novice_layer(adapter: Adapter, block: nn.Module, lp, vectors: torch.Tensor | None) -> None:
    """Surgery for one layer with novices: shrink the experts to the kept ones, keep the router whole."""
    E = lp.num_experts_in
    kept = [g.members[0] for g in lp.groups]
    if vectors is None:
        raise MoepruneError(f"layer {lp.layer}: no novice vectors given")
    if vectors.shape[0] != len(lp.novices):
        raise MoepruneError(
            f"layer {lp.layer}: {vectors.shape[0]} novice vectors for {len(lp.novices)} novices"
        )
    ex = adapter.experts(block)
    keep = torch.tensor(kept, dtype=torch.long)
    for name, p in adapter.expert_parameters(block).items():
        _set(ex, name, p.index_select(0, keep.to(p.device)).contiguous(), like=p)
    expert_map = torch.empty(E, dtype=torch.long)
    expert_map[keep] = torch.arange(len(kept))
    expert_map[torch.tensor(lp.novices, dtype=torch.long)] = len(kept) + torch.arange(len(lp.novices))
    attach_novices(adapter, block, expert_map, vectors)


def _set(owner: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Put `value` in place of parameter/buffer `name` (wrapping it as a Parameter when it was one)."""
    if name in owner._parameters:
        if not isinstance(value, nn.Parameter):
            grad = like.requires_grad if like is not None else owner._parameters[name].requires_grad
            value = nn.Parameter(value, requires_grad=grad)
        owner._parameters[name] = value
    else:
        owner._buffers[name] = value


def _router_tensors(adapter: Adapter, block: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(dotted name inside the router, owner, attribute, expert axis) of every router tensor indexed by
    expert."""
    router = adapter.router(block)
    names = {id(m): n for n, m in router.named_modules()}
    return [((names[id(owner)] + "." if names[id(owner)] else "") + leaf, owner, leaf, axis)
            for owner, leaf, axis in adapter.router_expert_tensors(block)]


def novice_router_names(adapter: Adapter, block: nn.Module) -> list[str]:
    """Dotted names inside the router of the tensors that run along the expert axis."""
    return [dotted for dotted, *_ in _router_tensors(adapter, block)]


def detach_novices(adapter: Adapter, block: nn.Module, i: int) -> tuple[dict[str, torch.Tensor], callable]:
    """The novice-file tensors of MoE layer i; its router is left holding only the kept rows, as on disk.

    The novice runtime is removed too (`Adapter.remove_novice_runtime`: the config's experts
    implementation goes back to the one it had). Returns the tensors and a function that puts the
    full router and the runtime back.
    """
    ex = adapter.experts(block)
    _, kept, novices = novice_slots(ex)
    tensors = {f"layer.{i}.expert_map": ex.expert_map.detach().cpu().contiguous(),
               f"layer.{i}.novice_vectors": ex.novice_vectors.detach().cpu().contiguous()}
    for name in ("novice_u", "novice_v"):  # low-rank novices
        if ex._buffers.get(name) is not None:
            tensors[f"layer.{i}.{name}"] = ex._buffers[name].detach().cpu().contiguous()
    swapped = []
    for dotted, owner, leaf, axis in _router_tensors(adapter, block):
        full = getattr(owner, leaf)
        rows = full.detach().index_select(axis, novices.to(full.device))  # novices' rows, for the file
        tensors[f"layer.{i}.router.{dotted}"] = rows.cpu().contiguous()
        swapped.append((owner, leaf, full))
        keep_rows = router_keep(kept, ex.expert_map.numel(), full.shape[axis])  # a skip class's row stays
        _set(owner, leaf, full.detach().index_select(axis, keep_rows.to(full.device)).contiguous(), like=full)
    adapter.remove_novice_runtime(block)

    def undo():
        for owner, leaf, full in swapped:
            _set(owner, leaf, full)
        adapter.install_novice_runtime(block)

    return tensors, undo


@torch.no_grad()
def reattach_novices(adapter: Adapter, block: nn.Module, expert_map: torch.Tensor, vectors: torch.Tensor,
                     router_rows: dict[str, torch.Tensor],
                     low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Put a loaded plain-pruned block back to its novice form: full router, E counts, novices attached.

    `router_rows` maps each `novice_router_names` entry to the novices' rows of that tensor, as
    `detach_novices` wrote them; `low_rank` (U, V [n, H, r]) the low-rank novices' factors.
    """
    E = expert_map.numel()
    kept_count = adapter.experts(block).down_proj.shape[0]
    order = expert_map.argsort()
    kept, novices = order[:kept_count], order[kept_count:]
    for dotted, owner, leaf, axis in _router_tensors(adapter, block):
        stock = getattr(owner, leaf)  # kept rows only
        rows = router_rows[dotted].to(device=stock.device, dtype=stock.dtype)
        shape = list(stock.shape)
        shape[axis] = E + stock.shape[axis] - kept_count  # the rows after the experts' (a skip class) too
        full = stock.new_empty(shape)
        full.index_copy_(axis, router_keep(kept, E, shape[axis]).to(stock.device), stock.detach())
        full.index_copy_(axis, novices.to(stock.device), rows)
        _set(owner, leaf, full, like=stock)
    adapter.set_block_num_experts(block, kept_count, E)  # router and block counts back to E
    attach_novices(adapter, block, expert_map, vectors, low_rank)  # experts' counts to E_kept
