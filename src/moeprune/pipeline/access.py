"""Read-only access to the expert weights of a model: the concrete `methods.access.WeightAccess`.

Methods stay pure: they never change the model and import no surgery. What they may read of an
MoE layer is implemented here — each expert's weight views, every expert's raw output on given
tokens (the probe), and the block's output with a candidate layer plan applied to a *copy* of the
block. The candidate evaluations use the family's own router and kernels, so NAEE-style
reconstruction errors and learned merge coefficients see exactly the routing the model would have
after surgery, group limits and renormalisation included, with no routing code re-implemented per
family. They live at the pipeline layer because they copy blocks and apply surgery to the copies.

Shape letters: E experts in, R experts out, H hidden, n probe tokens, K experts per token.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from torch import nn

from moeprune.arch import Adapter, ExpertWeights, get_adapter
from moeprune.arch.base import router_keep, with_fixed_rows
from moeprune.errors import MoepruneError
from moeprune.methods.access import NotExact
from moeprune.plan import ROUTER_MERGES, LayerPlan


class LayerAccess:
    """What a method may read of one MoE layer (a `methods.access.LayerWeights`)."""

    def __init__(self, adapter: Adapter, block: nn.Module, layer: int):
        self.adapter = adapter
        self.block = block
        self.layer = layer

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.block.parameters()).dtype

    def expert_weights(self, e: int) -> ExpertWeights:
        """Expert `e` as gate [I,H], up [I,H], down [H,I] (+ biases). Views: do not modify."""
        return self.adapter.expert_weights(self.block, e)

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """The fused expert tensors, expert axis first (read-only)."""
        return {k: v.detach() for k, v in self.adapter.expert_parameters(self.block).items()}

    @torch.no_grad()
    def expert_outputs(self, x: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """[E', n, D] raw (ungated) outputs of `experts` (default all) on block inputs x [n, H]."""
        ids = list(range(self.num_experts)) if experts is None else list(experts)
        dtype = next(self.block.parameters()).dtype
        x = self.adapter.expert_inputs(self.block, x.to(dtype)).to(dtype)  # [n, D] what the experts receive
        n = x.shape[0]
        rep = x.repeat(len(ids), 1)  # [E'*n, D]
        which = torch.tensor(ids).repeat_interleave(n)  # [E'*n]
        return self.adapter.expert_outputs(self.block, rep, which).view(len(ids), n, -1).float()

    def _check_runs_alone(self) -> None:
        why = self.adapter.block_alone_refusal(self.block)
        if why:
            raise MoepruneError(f"layer {self.layer}: {why}")

    @torch.no_grad()
    def block_output(self, x: torch.Tensor, layer_plan=None, novice_vectors=None) -> torch.Tensor:
        """[n, H] the MoE block's output on x [n, H], after `layer_plan` if given (on a copy; a plan with
        novices needs their vectors [N, D])."""
        from moeprune.surgery import apply_layer_plan

        self._check_runs_alone()
        block = self.block
        if layer_plan is not None:
            block = copy.deepcopy(self.block)
            apply_layer_plan(self.adapter, block, layer_plan, novice_vectors)
        dtype = next(block.parameters()).dtype
        out = self.adapter.moe_forward(block, x.to(dtype)[None])  # blocks take [B, L, H]
        return out.reshape(x.shape[0], -1).float()

    def merged_block(self, num_out: int, router_merge: str = "average",
                     aligned: LayerPlan | None = None) -> MergedBlock:
        """A differentiable copy of the block whose tensors `set(M)` replaces by `M @ W` (see
        `MergedBlock`)."""
        self._check_runs_alone()
        return MergedBlock(self.adapter, self.block, num_out, router_merge, aligned)

    def routed_lookup(self, x: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
        """A function of a subset S of the experts: [n, H] the routed sum of the block pruned to S on
        x [n, H].

        Every expert's output on x is computed once; a subset is scored by the block's own routing
        on a shell that shares the weights, with the experts replaced by a lookup (see `RoutedLookup`).
        """
        self._check_runs_alone()
        return RoutedLookup(self.adapter, self.block, x)


class ModelWeights:
    """Weight access for every MoE layer of an in-memory model (an out-of-core source can mimic it)."""

    def __init__(self, model: nn.Module):
        self.adapter = get_adapter(model.config)
        self._blocks = self.adapter.moe_blocks(model)

    def layers(self) -> list[int]:
        return sorted(self._blocks)

    def layer(self, i: int) -> LayerAccess:
        return LayerAccess(self.adapter, self._blocks[i], i)


class MergedBlock:
    """A copy of one MoE block whose expert and router tensors are `M @ W` for a given merge matrix.

    The original block is not modified and its large tensors are not duplicated: the copy is made
    with them left out, and `set(M)` installs fresh (possibly gradient-carrying) merged tensors.
    `aligned`, a LayerPlan whose groups carry `perms`, permutes the members' hidden units first,
    exactly as surgery does for aligned merges (UNCURL, M-SMoE). Computation is float32.
    """

    def __init__(self, adapter, block: torch.nn.Module, num_out: int, router_merge: str = "average",
                 aligned: LayerPlan | None = None):
        if router_merge not in ROUTER_MERGES:
            raise MoepruneError(f"router_merge {router_merge!r} is not one of {', '.join(ROUTER_MERGES)}")
        self.adapter, self.router_merge = adapter, router_merge
        expert_tensors = adapter.expert_parameters(block)
        router_tensors = adapter.router_expert_tensors(block)
        skip = [t for t in expert_tensors.values()] + [getattr(o, n) for o, n, _ in router_tensors]
        memo = {id(t): torch.empty(0) for t in skip}  # deepcopy maps these to placeholders
        self.block = copy.deepcopy(block, memo).float().requires_grad_(False)
        sources = dict(expert_tensors)
        if aligned is not None and any(g.perms is not None for g in aligned.groups):
            # members' hidden units permuted, as surgery does
            from moeprune.surgery.alignment import permute_members

            sources = permute_members(adapter, sources, aligned)
        self._experts = [(name, t.detach()) for name, t in sources.items()]  # originals, expert axis 0
        self._router = [(n, axis, getattr(o, n).detach(), self._path(block, o))
                        for o, n, axis in router_tensors]
        self.num_in = adapter.num_experts
        for name, _ in self._experts:  # plain attributes from now on, so they can carry gradients
            owner, leaf = adapter.expert_tensor_owner(self.block, name)
            owner._parameters.pop(leaf, None)
        for name, _, _, path in self._router:
            owner = self.block.get_submodule(path)
            owner._parameters.pop(name, None)
            owner._buffers.pop(name, None)
        adapter.set_block_num_experts(self.block, self.num_in, num_out)

    @staticmethod
    def _path(block: torch.nn.Module, owner: torch.nn.Module) -> str:
        for name, m in block.named_modules():
            if m is owner:
                return name
        raise KeyError("router tensor owner is not inside the block")

    def set(self, M: torch.Tensor) -> None:
        """Install merged tensors for the merge matrix M [R, E] (float32, may require grad)."""
        router_M = M if self.router_merge == "average" else (M.detach() != 0).float()
        for name, W in self._experts:
            M_full, _ = with_fixed_rows(M, None, W.shape[0])  # fixed rows past E carried over
            merged = torch.tensordot(M_full, W.float(), dims=([1], [0]))  # [R, ...]
            self.adapter.set_expert_tensor(self.block, name, merged, parameter=False)
        for name, axis, W, path in self._router:
            moved = W.float().movedim(axis, 0)
            router_full, _ = with_fixed_rows(router_M, None, moved.shape[0])  # a skip class's row unchanged
            merged = torch.tensordot(router_full, moved, dims=([1], [0])).movedim(0, axis)
            setattr(self.block.get_submodule(path), name, merged)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[n, H] block output on x [n, H] with the installed tensors."""
        out = self.adapter.moe_forward(self.block, x.float()[None])
        return out.reshape(x.shape[0], -1)


class _Captured(Exception):
    """Raised by the lookup experts to hand the routed sum out of the block's forward."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


class _Zero(nn.Module):
    """Stands in for shared experts on the scoring shell: their output cancels in Z − Ẑ."""

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(())


class RoutedLookup:
    """Routed sums Σ_k g_k(x) E_k(x) of one block pruned to candidate subsets, experts looked up.

    The experts' outputs on x [n, H] are computed once, one expert at a time (no [E*n, H] copy of
    the inputs). A subset is evaluated on a shell of the block: new modules sharing the very same
    weight tensors, only the sliced router tensors new, shared experts zeroed, and the experts'
    forward replaced by a lookup into those outputs that raises the routed sum out of the forward.
    So the routing is the family's own. `NotExact` says the lookup cannot reproduce the block.
    """

    def __init__(self, adapter: Adapter, block: nn.Module, x: torch.Tensor):
        self.adapter, self.block = adapter, block
        self.E = adapter.num_experts
        dtype = next(block.parameters()).dtype
        self._xs = x.to(dtype)
        n = self._xs.shape[0]
        with torch.no_grad():
            x_in = adapter.expert_inputs(block, self._xs).to(dtype)  # [n, D] what the experts receive
        # the routed experts, then the never-pruned routable ones after them (zero-compute experts)
        self._Y = torch.stack([adapter.expert_outputs_to_block(
            block, adapter.expert_outputs(block, x_in, torch.full((n,), e, dtype=torch.long)))
            for e in range(self.E + adapter.fixed_experts)])  # [E + F, n, H]
        self._rows = torch.arange(n)[:, None]  # [n, 1]

    @torch.no_grad()  # a search over subsets: the routers' weights need no graph (Gemma 4's router has one)
    def __call__(self, subset) -> torch.Tensor:
        """[n, H] the routed sum of the block pruned to `subset`."""
        block, adapter = self.block, self.adapter
        keep = torch.tensor(sorted(int(e) for e in subset))
        shared = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
        shared.update({id(m.config): m.config for m in block.modules() if hasattr(m, "config")})  # read-only
        shell = copy.deepcopy(block, shared)  # new modules, the very same weight tensors
        for owner, name, axis in adapter.router_expert_tensors(shell):
            full = getattr(owner, name)
            rows = router_keep(keep, self.E, full.shape[axis])  # rows past E (a skip class) stay
            t = full.index_select(axis, rows.to(full.device))
            if name in owner._parameters:
                owner._parameters[name] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[name] = t
        adapter.set_block_num_experts(shell, self.E, len(keep))
        for attr in adapter.shared_expert_modules(shell):
            setattr(shell, attr, _Zero())
        Y, rows, n = self._Y, self._rows, self._xs.shape[0]

        def lookup(hidden, top_k_index, top_k_weights):
            rows_seen = hidden.reshape(-1, hidden.shape[-1]).shape[0]  # [B, L, H] for DBRX's experts
            if rows_seen != n:
                raise NotExact(f"the experts saw {rows_seen} rows, not the {n} probe tokens")
            fixed = torch.arange(self.E, self.E + adapter.fixed_experts)  # after the kept ones, renumbered
            y = Y[torch.cat([keep, fixed])[top_k_index], rows]  # [n, K, H]
            raise _Captured((y.float() * top_k_weights.float()[..., None]).sum(dim=1))

        adapter.experts(shell).forward = lookup  # on the shell only: the model's block is untouched
        try:
            adapter.moe_forward(shell, self._xs[None])
        except _Captured as c:
            return c.value
        raise NotExact("the block returned without calling its experts")


class ShardedWeights:
    """Weight access for every MoE layer of a checkpoint source, one layer in memory.

    `layer(i)` reads layer i from the shards and frees the one read before, so a method that walks
    the layers in order (they all do) plans a model of any size in the memory of one layer. A walk
    over the same source in between frees (and may replace) layers, so the live ones are looked up.
    """

    def __init__(self, source):
        self.source = source
        self.adapter = source.adapter
        self._loaded: int | None = None

    def layers(self) -> list[int]:
        return sorted(self.source.blocks)

    def layer(self, i: int) -> LayerAccess:
        from moeprune.store.sharded import free

        ck = self.source.ck
        freed = any(p.is_meta for p in ck.layers[i].parameters())
        if self._loaded != i or freed:
            if self._loaded is not None and self._loaded != i:
                free(ck.layers[self._loaded])
            ck.load_layer(i)
            self._loaded = i
        return LayerAccess(self.adapter, self.source.blocks[i], i)
