"""The adapter interface: everything moeprune needs to know about one MoE family.

An adapter is declarative where it can be: which config field holds the expert count, where the
router sits, how the fused expert tensors are laid out, which router tensors run along the expert
axis, whether routing is group-limited. Generic code in this module turns those facts into
per-expert weight views, raw expert outputs, and the list of integers that must change with the
expert count. A new family is normally one small subclass in `families.py` plus a tiny config.

Shape letters: E experts, K top-k, H hidden, I expert width, T tokens, S routed (token, expert) pairs.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from moeprune import compat
from moeprune.compat import is_decoder_layer

# Integer attributes that transformers modules cache from the config's expert count.
EXPERT_COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


@dataclass
class ExpertWeights:
    """One expert's weights in the canonical (out, in) orientation, views where the layout allows."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layer list and its dotted prefix (e.g. `model.layers.`).

    Found structurally rather than via `base_model_prefix`, which Llama 4's text model breaks.
    """
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(is_decoder_layer(child) for child in module)
        ):
            return module, name + "."
    raise ValueError(f"{type(model).__name__} has no list of decoder layers")


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)


# ---- novices at run time ----------------------------------------------------------------------
# A block with novices (MoNE; made by `moeprune.surgery.novices`) keeps its router at E rows while its
# experts tensors hold only the E_kept kept experts; two non-persistent buffers on the experts module
# carry the rest: `expert_map [E]` (router id -> slot; slot E_kept + n is novice n) and
# `novice_vectors [n, H]`. Shape letters here also: P kept pairs, Q novice pairs.
NOVICE_IMPLEMENTATION = "moeprune_novice"  # the tag of the experts implementations moeprune registers


def is_novice_experts(experts: nn.Module) -> bool:
    return "expert_map" in experts._buffers and "novice_vectors" in experts._buffers


def novice_slots(experts: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(E_kept, kept router ids in slot order, novice router ids in novice order)."""
    kept_count = experts.gate_up_proj.shape[0]
    order = experts.expert_map.argsort()  # slots are a permutation of 0..E-1
    return kept_count, order[:kept_count], order[kept_count:]


def novice_experts_forward(self, kernel, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, **kwargs) -> torch.Tensor:
    """Experts forward with novices: [T, H], [T, K] router ids, [T, K] gates -> [T, H].

    `kernel` is the family's own experts forward (the implementation the model had before), which
    runs the kept pairs, one pair per row with remapped ids; a novice pair adds `g * novice`.
    Experts modules without novices (the config is shared by every layer) run `kernel` as is.
    """
    if not is_novice_experts(self):
        return kernel(self, hidden_states, top_k_index, top_k_weights, **kwargs)
    T, H = hidden_states.shape
    kept_count = self.gate_up_proj.shape[0]
    slots = self.expert_map[top_k_index]  # [T, K]
    is_kept = slots < kept_count  # [T, K]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    tok, k = is_kept.nonzero(as_tuple=True)  # [P]
    if tok.numel():
        y = kernel(self, hidden_states[tok], slots[tok, k][:, None], top_k_weights[tok, k][:, None], **kwargs)
        out.index_add_(0, tok, y.float())  # [P, H] summed into the tokens
    tok_n, k_n = (~is_kept).nonzero(as_tuple=True)  # [Q]
    if tok_n.numel():
        v = self.novice_vectors[slots[tok_n, k_n] - kept_count].float()  # [Q, H]
        out.index_add_(0, tok_n, top_k_weights[tok_n, k_n, None].float() * v)
    return out.to(hidden_states.dtype)


def _novice_instance_forward(self, *args, **kwargs):
    """Instance forward for an experts class transformers does not dispatch: its class forward is the
    kernel."""
    return novice_experts_forward(self, type(self).forward, *args, **kwargs)


class Adapter:
    """Facts about one family; subclasses override the class attributes and, rarely, a method."""

    model_types: tuple[str, ...] = ()
    count_field: str = "num_experts"  # config field holding E (aliases do not work for every family)
    top_k_field: str = "num_experts_per_tok"
    router_attr: str = "gate"  # attribute of the MoE block holding the router
    router_logits_index: int = 0  # position of the logits in the router's output tuple
    # Router tensors that run along the expert axis: (dotted name inside the router, axis of E).
    router_tensors: tuple[tuple[str, int], ...] = (("weight", 0), ("bias", 0), ("e_score_correction_bias", 0))
    shared_attrs: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_expert_gate")
    transposed: bool = False  # experts stored [E, H, 2I] / [E, I, H] instead of [E, 2I, H] / [E, H, I]
    interleaved: bool = False  # gate and up interleaved along 2I (GPT-OSS) instead of concatenated
    group_limited: bool = False  # routing first picks `topk_group` of `n_group` contiguous expert groups
    min_experts_per_group: int = 2  # DeepSeek-V3 scores a group by the sum of its top-2 experts
    # The experts run every (expert, token) row on router-score-scaled inputs, take only that input
    # and return [E*T, H] (Llama 4); the observer then reads the [T, E] scores, zero outside the
    # top-k, at `router_scores_index` of the router's output.
    dense_experts: bool = False
    router_scores_index: int = 0

    def __init__(self, config):
        self.config = config

    # ---- config facts -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.count_field))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.top_k_field))

    @property
    def n_group(self) -> int:
        """Number of routing groups the expert count must stay divisible by (1 when not grouped)."""
        if not self.group_limited:
            return 1
        return int(getattr(self.config, "n_group", None) or 1)

    def survivors_exact(self) -> tuple[bool, str]:
        """Whether a token whose top-k all survive pruning gets exactly the same MoE output, and why."""
        return True, "top-k weights are renormalised over the selected experts"

    # ---- module access ------------------------------------------------------------------------
    def moe_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """Decoder layer index -> MoE block, for every layer that has routed experts."""
        layers, _ = decoder_layers(model)
        blocks = {}
        for i, layer in enumerate(layers):
            found = [m for m in layer.modules() if _is_moe_block(m)]
            if found:
                blocks[i] = found[0]
        return blocks

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        return block.experts

    def router_logits(self, router_output) -> torch.Tensor:
        """[T, E] logits from whatever the router module returns."""
        if isinstance(router_output, tuple):
            return router_output[self.router_logits_index]
        return router_output

    def router_expert_tensors(self, block: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """(owner module, attribute name, expert axis) for every router tensor indexed by expert."""
        router = self.router(block)
        found = []
        for dotted, axis in self.router_tensors:
            owner_path, _, leaf = dotted.rpartition(".")
            owner = router.get_submodule(owner_path) if owner_path else router
            if isinstance(getattr(owner, leaf, None), torch.Tensor):
                found.append((owner, leaf, axis))
        return found

    # ---- expert weights ----------------------------------------------------------------------
    def expert_weights(self, block: nn.Module, e: int) -> ExpertWeights:
        """Expert `e`'s weights as (gate [I,H], up [I,H], down [H,I], biases), whatever the layout."""
        ex = self.experts(block)
        gate_up = ex.gate_up_proj[e]  # [2I, H], or [H, 2I] when transposed
        down = ex.down_proj[e]  # [H, I], or [I, H] when transposed
        if self.transposed:
            gate_up, down = gate_up.T, down.T
        gate, up = (gate_up[0::2], gate_up[1::2]) if self.interleaved else gate_up.chunk(2, dim=0)
        gate_bias = up_bias = down_bias = None
        if isinstance(getattr(ex, "gate_up_proj_bias", None), torch.Tensor):
            gub = ex.gate_up_proj_bias[e]  # [2I]
            gate_bias, up_bias = (gub[0::2], gub[1::2]) if self.interleaved else gub.chunk(2)
        if isinstance(getattr(ex, "down_proj_bias", None), torch.Tensor):
            down_bias = ex.down_proj_bias[e]  # [H]
        return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)

    def expert_parameters(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """Every experts tensor whose first axis is the expert axis."""
        return dict(self.experts(block).named_parameters(recurse=False))

    @torch.no_grad()
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Raw outputs E_e(x) before gating: row s is expert `expert_ids[s]` applied to `x[s]`.

        x: [S, H], expert_ids: [S] -> [S, H]. Runs the family's own experts kernel with top-1 routing
        and unit weights, so the numbers are exactly what the model computes for that pair.
        """
        ex = self.experts(block)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)  # [S, 1]
        return type(ex).forward(ex, x, expert_ids[:, None], ones)

    def install_novice_runtime(self, block: nn.Module) -> None:
        """Make the block's experts (which carry novice buffers) add their novices at run time.

        Experts classes dispatched through transformers' `ALL_EXPERTS_FUNCTIONS` get there: this
        sets their config's `_experts_implementation` (shared by every layer, and by the model) to
        "moeprune_novice:<previous>", whose function runs the previous implementation for the kept
        pairs and for every experts module without novices; `remove_novice_runtime` restores it.
        Calling `set_experts_implementation` afterwards replaces it and so bypasses the novices.
        Other experts classes get an instance forward.
        """
        ex = self.experts(block)
        if compat.dispatches_experts(ex):
            compat.route_experts_through(ex, NOVICE_IMPLEMENTATION, novice_experts_forward)
        else:
            ex.forward = types.MethodType(_novice_instance_forward, ex)

    def remove_novice_runtime(self, block: nn.Module) -> None:
        """Undo `install_novice_runtime` (the novice buffers stay)."""
        ex = self.experts(block)
        if compat.dispatches_experts(ex):
            compat.restore_experts_implementation(ex, NOVICE_IMPLEMENTATION)
        else:
            ex.__dict__.pop("forward", None)

    # ---- counts -------------------------------------------------------------------------------
    def set_block_num_experts(self, block: nn.Module, old: int, new: int) -> None:
        """Update every cached integer in the block (router, experts, block) that holds E."""
        shared = {id(m) for a in self.shared_attrs if isinstance(getattr(block, a, None), nn.Module)
                  for m in getattr(block, a).modules()}
        for module in block.modules():
            if id(module) in shared:
                continue
            for attr in EXPERT_COUNT_ATTRS:
                if getattr(module, attr, None) == old and not isinstance(getattr(module, attr), bool):
                    setattr(module, attr, new)
        router = self.router(block)
        if isinstance(router, nn.Linear):
            router.out_features = new

    def set_config_num_experts(self, model: nn.Module, old: int, new: int) -> None:
        """Set the config's expert count and the copies cached on the top-level model at init."""
        setattr(self.config, self.count_field, new)
        if model.config is not self.config:
            setattr(model.config, self.count_field, new)
        for module in (model, getattr(model, "model", None)):
            if module is None:
                continue
            for attr in EXPERT_COUNT_ATTRS:
                if getattr(module, attr, None) == old:
                    setattr(module, attr, new)

    def flatten_groups(self, model: nn.Module) -> None:
        """Turn group-limited routing off (n_group = topk_group = 1), in the config and the routers."""
        for cfg in {id(c): c for c in (self.config, model.config)}.values():
            cfg.n_group = 1
            cfg.topk_group = 1
        for block in self.moe_blocks(model).values():
            self.flatten_block_groups(block)

    def flatten_block_groups(self, block: nn.Module) -> None:
        """Turn group-limited routing off in one MoE block's router (its cached group counts)."""
        router = self.router(block)
        for attr in ("n_group", "num_group"):
            if hasattr(router, attr):
                setattr(router, attr, 1)
        if hasattr(router, "topk_group"):
            router.topk_group = 1

    # ---- descriptions -------------------------------------------------------------------------
    def shared_expert_modules(self, block: nn.Module) -> list[str]:
        return [a for a in self.shared_attrs if isinstance(getattr(block, a, None), nn.Module)]
