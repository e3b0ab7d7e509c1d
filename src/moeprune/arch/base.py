"""The adapter interface: everything moeprune needs to know about one MoE family.

An adapter is declarative where it can be: which config field holds the expert count, where the
router sits, how the fused expert tensors are laid out, which router tensors run along the expert
axis, whether routing is group-limited. Generic code in this module turns those facts into
per-expert weight views, raw expert outputs, and the list of integers that must change with the
expert count. A new family is normally one small subclass in `families.py` plus a tiny config.

Shape letters: E experts, K top-k, H hidden, I expert width, T tokens, S routed (token, expert) pairs.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
from torch import nn

from moeprune import compat
from moeprune.compat import is_decoder_layer
from moeprune.errors import MoepruneError

# Integer attributes that transformers modules cache from the config's expert count.
EXPERT_COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
# Config fields that hold the routed-expert count and the top-k, in the order they are tried when a
# family's facts name none (several configs alias one to another through `attribute_map`).
COUNT_FIELDS = (
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
)
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k", "moe_top_k")


@dataclass
class ExpertWeights:
    """One expert's weights in the canonical (out, in) orientation, views where the layout allows."""

    gate: torch.Tensor | None  # [I, H]; None for non-gated experts (up -> act -> down)
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]


def _is_moe_block(module: nn.Module) -> bool:
    """A module holding fused experts: `experts.gate_up_proj [E, ...]` (gated) or `experts.up_proj` (not)."""
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and any(
        isinstance(getattr(experts, name, None), torch.Tensor) and getattr(experts, name).dim() == 3
        for name in ("gate_up_proj", "up_proj")
    )


def text_config(config):
    """The language model's config: `config` itself, or its `text_config` (vision-language models)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _language_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The text decoder of `model` and its dotted prefix, through transformers' own `get_decoder`.

    A vision-language model holds decoder-layer lists in its vision tower too; `get_decoder` names the
    language model (`model.language_model`), so the layers found below are the text ones.
    """
    root = model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            root = get_decoder() or model
        except (AttributeError, NotImplementedError, ValueError):  # the few models without a rule
            root = model
    if root is model:
        return model, ""
    for name, module in model.named_modules():
        if module is root:
            return root, name + "."
    return model, ""


def _layer_lists(module: nn.Module):
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) and all(is_decoder_layer(c) for c in child):
            yield name, child


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The language model's decoder layer list and its dotted prefix (e.g. `model.layers.`).

    Searched inside the text decoder (`_language_model`), and among its layer lists the first that holds
    routed experts, so a vision tower's blocks or an MTP/draft stack are never taken for the decoder.
    Found structurally rather than via `base_model_prefix`, which Llama 4's text model breaks.
    """
    root, root_prefix = _language_model(model)
    lists = list(_layer_lists(root))
    if not lists:
        root_prefix, lists = "", list(_layer_lists(model))
    if not lists:
        raise MoepruneError(f"{type(model).__name__} has no list of decoder layers")
    with_experts = [(n, lst) for n, lst in lists if any(_is_moe_block(m) for m in lst.modules())]
    name, layers = (with_experts or lists)[0]
    return layers, root_prefix + name + "."


def text_generator(model: nn.Module) -> nn.Module:
    """The module whose forward maps `input_ids` to text logits: `model` itself, or, where the model's class
    implements no forward (Qwen3-Omni's, which only generates), its child holding the language model's
    decoder layers (the thinker), which shares every tensor with `model`."""
    if type(model).forward is not nn.Module.forward:
        return model
    _, prefix = decoder_layers(model)
    for name, child in model.named_children():
        if prefix.startswith(name + ".") and type(child).forward is not nn.Module.forward:
            return child
    return model


# ---- novices at run time ----------------------------------------------------------------------
# A block with novices (MoNE; made by `moeprune.surgery.novices`) keeps its router at E rows while its
# experts tensors hold only the E_kept kept experts; two non-persistent buffers on the experts module
# carry the rest: `expert_map [E]` (router id -> slot; slot E_kept + n is novice n) and
# `novice_vectors [n, H]`. Low-rank novices (fitted by compensation, `moeprune.methods.compensation`)
# add two more, `novice_u` and `novice_v` [n, H, r]: novice i's output is `b_i + U_i (V_iᵀ x)`. Without
# them everything runs as before. Shape letters here also: P kept pairs, Q novice pairs.
NOVICE_IMPLEMENTATION = "moeprune_novice"  # the tag of the experts implementations moeprune registers


def is_novice_experts(experts: nn.Module) -> bool:
    return "expert_map" in experts._buffers and "novice_vectors" in experts._buffers


def has_low_rank_novices(experts: nn.Module) -> bool:
    return "novice_u" in experts._buffers and "novice_v" in experts._buffers


NOVICE_BUFFERS = ("novice_vectors", "novice_u", "novice_v")  # what a novice holds besides its router row


def novice_parameter_count(experts: nn.Module) -> int:
    """Elements of the novices' tensors (vectors, and low-rank factors: n·(H + 2·H·r)); 0 without novices."""
    buffers = experts._buffers
    return sum(int(buffers[k].numel()) for k in NOVICE_BUFFERS if buffers.get(k) is not None)


def novice_slots(experts: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(E_kept, kept router ids in slot order, novice router ids in novice order)."""
    kept_count = experts.down_proj.shape[0]
    order = experts.expert_map.argsort()  # slots are a permutation of 0..E-1
    return kept_count, order[:kept_count], order[kept_count:]


def novice_experts_forward(self, kernel, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, **kwargs) -> torch.Tensor:
    """Experts forward with novices: [T, H], [T, K] router ids, [T, K] gates -> [T, H].

    `kernel` is the family's own experts forward (the implementation the model had before), which
    runs the kept pairs, one pair per row with remapped ids; a novice pair adds `g * novice`, where a
    low-rank novice is `b + U (Vᵀ x)`. Experts modules without novices (the config is shared by every
    layer) run `kernel` as is.
    """
    if not is_novice_experts(self):
        return kernel(self, hidden_states, top_k_index, top_k_weights, **kwargs)
    T, H = hidden_states.shape  # H: the experts' width D
    kept_count = self.down_proj.shape[0]
    slots = self.expert_map[top_k_index]  # [T, K]
    is_kept = slots < kept_count  # [T, K]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    tok, k = is_kept.nonzero(as_tuple=True)  # [P]
    if tok.numel():
        y = kernel(self, hidden_states[tok], slots[tok, k][:, None], top_k_weights[tok, k][:, None], **kwargs)
        out.index_add_(0, tok, y.float())  # [P, H] summed into the tokens
    tok_n, k_n = (~is_kept).nonzero(as_tuple=True)  # [Q]
    if tok_n.numel():
        which = slots[tok_n, k_n] - kept_count  # [Q]
        v = self.novice_vectors[which].float()  # [Q, H]
        if has_low_rank_novices(self):
            v = v + _low_rank_outputs(self, hidden_states[tok_n], which)
        out.index_add_(0, tok_n, top_k_weights[tok_n, k_n, None].float() * v)
    return out.to(hidden_states.dtype)


def _low_rank_outputs(experts: nn.Module, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """[Q, H] `U_i (V_iᵀ x_q)` of novice i = which[q] on x [Q, H], a novice at a time (no [Q, H, r] copy)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for i in which.unique().tolist():
        rows = (which == i).nonzero().squeeze(1)
        proj = x[rows].float() @ experts.novice_v[i].float()  # [Q_i, r]
        out[rows] = proj @ experts.novice_u[i].float().T  # [Q_i, H]
    return out


def _novice_instance_forward(self, *args, **kwargs):
    """Instance forward for an experts class transformers does not dispatch: its class forward is the
    kernel."""
    return novice_experts_forward(self, type(self).forward, *args, **kwargs)


# ---- rows after the experts ------------------------------------------------------------------------
# Some families hold rows along the expert axis past the E routed experts that are never pruned: ZAYA's
# skip class (a token routed there skips the MoE), LongCat-Flash's zero-compute (identity) experts,
# Inkling's shared experts' router rows. Pruning and merging carry them over unchanged, after the new rows.
def router_keep(keep: torch.Tensor, num_experts: int, size: int) -> torch.Tensor:
    """Rows to keep of a tensor with `size` rows along the expert axis: the kept experts', then every row
    after the E experts', in order."""
    return torch.cat([keep, torch.arange(num_experts, size, dtype=keep.dtype, device=keep.device)])


def with_fixed_rows(M: torch.Tensor, keep: torch.Tensor | None, size: int):
    """The merge matrix and keep index for an expert axis of `size` >= E_in entries.

    M: [E_out, E_in] -> [E_out + F, E_in + F]; keep: [E_out] -> [E_out + F] (F = size - E_in fixed rows,
    each mapped to itself).
    """
    E_out, E_in = M.shape
    fixed = size - E_in
    if fixed <= 0:
        return M, keep
    full = torch.zeros(E_out + fixed, size, dtype=M.dtype, device=M.device)
    full[:E_out, :E_in] = M
    full[E_out:, E_in:] = torch.eye(fixed, dtype=M.dtype, device=M.device)
    if keep is not None:
        keep = router_keep(keep, E_in, size)
    return full, keep


def _first_int_field(config, names: tuple[str, ...], what: str) -> str:
    """The first of `names` that `config` holds as a positive int itself (not through `attribute_map`, so
    writing it writes the field that is saved)."""
    aliases = getattr(type(config), "attribute_map", {}) or {}
    for name in sorted(names, key=lambda n: n in aliases):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name
    raise MoepruneError(
        f"{type(config).__name__} ({config.model_type}) has no {what} field (looked for {', '.join(names)}); "
        "is this a Mixture-of-Experts model?"
    )


def _field(config, dotted: str):
    """A config field by its dotted name (`ffn_config.moe_num_experts`: DBRX nests its expert count)."""
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def _own_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers held by `module` itself (not its children)."""
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return [n for n, _ in own]


class Adapter:
    """Facts about one family; most are derived from the model, the rest come from `facts.FAMILIES`.

    Derived from transformers' own declarations (so a family needs no code of its own):
    - the expert count and top-k from the first of `COUNT_FIELDS` / `TOP_K_FIELDS` the text config has;
    - the router, and the index of its logits, from the model's `_can_record_outputs["router_logits"]`;
    - the experts layout (transposed, interleaved, gated, biased) from the flags
      `use_experts_implementation` puts on the experts module;
    - every tensor along the expert axis: the router's own tensors (weights, biases, correction biases,
      `moe_statics`), the block's direct tensors (`e_score_correction_bias`, `expert_bias`) and every
      experts parameter (per-expert scales included) with an axis of size E.
    A class attribute set to something other than None overrides the derived value.
    """

    model_types: tuple[str, ...] = ()
    count_field: str | None = None  # config field holding E (None: the first of COUNT_FIELDS present)
    top_k_field: str | None = None  # config field holding k (None: the first of TOP_K_FIELDS present)
    router_attr: str | None = None  # attribute of the MoE block holding the router (None: recorded class)
    router_logits_index: int | None = None  # position of the logits in the router's output tuple
    # Router tensors that run along the expert axis, (dotted name inside the router, axis of E); None:
    # every router and block tensor with an axis of size E.
    router_tensors: tuple[tuple[str, int], ...] | None = None
    shared_attrs: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")
    transposed: bool | None = None  # experts [E, H, 2I] / [E, I, H] (None: the experts' is_transposed)
    interleaved: bool | None = None  # gate/up interleaved along 2I (None: not the experts' is_concatenated)
    group_limited: bool = False  # routing first picks `topk_group` of `n_group` contiguous expert groups
    min_experts_per_group: int = 2  # DeepSeek-V3 scores a group by the sum of its top-2 experts
    # The experts run every (expert, token) row on router-score-scaled inputs, take only that input
    # and return [E*T, H] (Llama 4); the observer then reads the [T, E] scores, zero outside the
    # top-k, at `router_scores_index` of the router's output.
    dense_experts: bool = False
    router_scores_index: int = 0
    # The router hands a token it sends to its skip class (ZAYA) to the experts as expert 0 with gate 0;
    # the observer drops such pairs, so they count for no expert.
    skip_class: bool = False
    # Routable experts after the E routed ones that are never pruned (LongCat-Flash's zero-compute experts)
    fixed_experts: int = 0
    # Why the family cannot take MoNE novices (None: it can); the prune checks say it before any work.
    novice_refusal: str | None = None
    # A module of the block that the experts' input passes through while the router reads the block
    # input itself (Gemma 4: `pre_feedforward_layernorm_2`); None: the experts read the block input.
    expert_input_attr: str | None = None

    def __init__(self, config, facts=None):
        """`facts`: the family's `arch.facts.Family` row (routing rule, group rule, field overrides)."""
        self.full_config = config  # the checkpoint's config (a vision-language one for VLMs)
        self.config = text_config(config)  # the language model's, which holds the expert count
        self.facts = facts
        self._layout: dict | None = None
        if facts is not None:
            self.count_field = facts.count_field or self.count_field
            self.top_k_field = facts.top_k_field or self.top_k_field
            if facts.groups == "max":  # DeepSeek-V2: a group's best expert, and only with this method
                self.min_experts_per_group = 1
                self.group_limited = getattr(self.config, "topk_method", "greedy") == "group_limited_greedy"
            elif facts.groups == "top2":  # DeepSeek-V3: the sum of a group's two best
                self.min_experts_per_group = 2
                self.group_limited = True
        if self.count_field is None:
            self.count_field = _first_int_field(self.config, COUNT_FIELDS, "expert count")
        if self.top_k_field is None:
            self.top_k_field = _first_int_field(self.config, TOP_K_FIELDS, "top-k")

    # ---- config facts -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def num_experts(self) -> int:
        return int(_field(self.config, self.count_field))

    @property
    def top_k(self) -> int:
        return int(_field(self.config, self.top_k_field))

    def write_num_experts(self, config, value: int) -> None:
        """Set the expert count in `config` (a text config), at its field, nested ones (DBRX) included."""
        owner_path, _, leaf = self.count_field.rpartition(".")
        setattr(_field(config, owner_path) if owner_path else config, leaf, value)

    @property
    def expert_dim(self) -> int:
        """D: the width the experts read and write (H, unless they run in a projected space)."""
        return int(self.config.hidden_size)

    def expert_inputs(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[n, H] MoE-block inputs (what the router and the probe see) -> [n, D] what the experts receive.

        The probe holds block inputs, which the router and `moe_forward` need; whatever runs the experts on
        them goes through this first, so the experts see what they see in the model (Gemma 4's
        `expert_input_attr` norm, Nemotron-H's latent projection).
        """
        if self.expert_input_attr is None:
            return x
        return block.get_submodule(self.expert_input_attr)(x)

    def expert_outputs_to_block(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """[..., D] routed expert outputs -> [..., H] their part of the block's output: the linear map after
        the experts (without its bias, which does not depend on the routing); the identity when D is H."""
        return y

    @property
    def n_group(self) -> int:
        """Number of routing groups the expert count must stay divisible by (1 when not grouped)."""
        if not self.group_limited:
            return 1
        return int(getattr(self.config, "n_group", None) or 1)

    def survivors_exact(self) -> tuple[bool, str]:
        """Whether a token whose top-k all survive pruning gets exactly the same MoE output, and why."""
        if self.facts is not None:
            return self.facts.rule(self)
        return False, "not established for this family (no routing rule in moeprune.arch.facts)"

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

    def _recorded_routers(self) -> dict[type, int]:
        return compat.recorded_routers(self.full_config)

    def router(self, block: nn.Module) -> nn.Module:
        """The block's router: the child whose class the model records router logits from."""
        if self.router_attr is not None:
            return getattr(block, self.router_attr)
        recorded = tuple(self._recorded_routers())
        for child in block.children():
            if recorded and isinstance(child, recorded):
                return child
        for name in ("gate", "router"):  # models that record no router class
            if isinstance(getattr(block, name, None), nn.Module):
                return getattr(block, name)
        raise MoepruneError(f"{type(block).__name__} has no router the model declares "
                            "(_can_record_outputs['router_logits']) and no `gate`/`router` child")

    def experts(self, block: nn.Module) -> nn.Module:
        """The block's experts module; the first call also reads its layout flags into the adapter."""
        ex = block.experts
        if self._layout is None:
            self._layout = compat.experts_layout(ex) or {}
            if self.transposed is None:
                self.transposed = self._layout.get("is_transposed", False)
            if self.interleaved is None:
                self.interleaved = not self._layout.get("is_concatenated", True)
        return ex

    @property
    def gated(self) -> bool:
        return self._layout.get("has_gate", True) if self._layout else True

    def logits_index(self, router: nn.Module) -> int:
        if self.router_logits_index is not None:
            return self.router_logits_index
        for cls, index in self._recorded_routers().items():
            if isinstance(router, cls):
                return index
        return 0

    def router_logits(self, router_output, router: nn.Module | None = None) -> torch.Tensor:
        """[T, E] logits from whatever the router module returns."""
        if isinstance(router_output, tuple):
            index = self.router_logits_index if router is None else self.logits_index(router)
            return router_output[index or 0]
        return router_output

    def router_expert_tensors(self, block: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """(owner module, attribute name, expert axis) for every router tensor indexed by expert.

        Without declared `router_tensors`: every tensor of the router (recursively, so `moe_statics`
        is found) and every direct tensor of the block with an axis of size E, at the first such axis.
        """
        router = self.router(block)
        if self.router_tensors is not None:
            found = []
            for dotted, axis in self.router_tensors:
                owner_path, _, leaf = dotted.rpartition(".")
                owner = router.get_submodule(owner_path) if owner_path else router
                if isinstance(getattr(owner, leaf, None), torch.Tensor):
                    found.append((owner, leaf, axis))
            return found
        E = self.num_experts
        found, seen = [], set()
        owners = [(m, t) for m in router.modules() for t in _own_tensors(m)]
        owners += [(block, t) for t in _own_tensors(block)]
        for owner, leaf in owners:
            tensor = getattr(owner, leaf)
            if id(tensor) in seen or E not in tensor.shape:
                continue
            seen.add(id(tensor))
            found.append((owner, leaf, list(tensor.shape).index(E)))
        return found

    # ---- expert weights ----------------------------------------------------------------------
    def expert_weights(self, block: nn.Module, e: int) -> ExpertWeights:
        """Expert `e`'s weights as (gate [I,H], up [I,H], down [H,I], biases), whatever the layout."""
        ex = self.experts(block)
        down = ex.down_proj[e]  # [H, I], or [I, H] when transposed
        gate_bias = up_bias = down_bias = None
        if not self.gated:  # up -> act -> down: `up_proj [E, I, H]`
            up = ex.up_proj[e].T if self.transposed else ex.up_proj[e]  # [I, H]
            gate = None
            if isinstance(getattr(ex, "up_proj_bias", None), torch.Tensor):
                up_bias = ex.up_proj_bias[e]
        else:
            gate_up = ex.gate_up_proj[e]  # [2I, H], or [H, 2I] when transposed
            if self.transposed:
                gate_up = gate_up.T
            gate, up = (gate_up[0::2], gate_up[1::2]) if self.interleaved else gate_up.chunk(2, dim=0)
        if self.transposed:
            down = down.T
        if self.gated and isinstance(getattr(ex, "gate_up_proj_bias", None), torch.Tensor):
            gub = ex.gate_up_proj_bias[e]  # [2I]
            gate_bias, up_bias = (gub[0::2], gub[1::2]) if self.interleaved else gub.chunk(2)
        if isinstance(getattr(ex, "down_proj_bias", None), torch.Tensor):
            down_bias = ex.down_proj_bias[e]  # [H]
        return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)

    def expert_parameters(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """Every experts tensor whose first axis is the expert axis."""
        return dict(self.experts(block).named_parameters(recurse=False))

    def expert_tensor_owner(self, block: nn.Module, name: str) -> tuple[nn.Module, str]:
        """(module, attribute) holding the experts tensor `name` of `expert_parameters` (may be dotted)."""
        owner_path, _, leaf = name.rpartition(".")
        ex = self.experts(block)
        return (ex.get_submodule(owner_path) if owner_path else ex), leaf

    def set_expert_tensor(self, block: nn.Module, name: str, value: torch.Tensor, *,
                          parameter: bool = True) -> None:
        """Put `value` [E', ...], in the form `expert_parameters` gives (expert axis first), in place of the
        experts tensor `name`: as a parameter (its grad flag kept), or with `parameter=False` as a plain
        attribute, which may carry gradients."""
        owner, leaf = self.expert_tensor_owner(block, name)
        old = owner._parameters.pop(leaf, None)
        if parameter:
            grad = old.requires_grad if old is not None else False
            owner._parameters[leaf] = nn.Parameter(value.contiguous(), requires_grad=grad)
        else:
            setattr(owner, leaf, value)

    def moe_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H] the MoE block's output on its input x [B, L, H]: router, experts, shared experts."""
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Raw outputs E_e(x) before gating: row s is expert `expert_ids[s]` applied to `x[s]`.

        x: [S, H], expert_ids: [S] -> [S, H]. Runs the family's own experts kernel with top-1 routing
        and unit weights, so the numbers are exactly what the model computes for that pair.
        """
        ex = self.experts(block)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)  # [S, 1]
        return type(ex).forward(ex, x, expert_ids[:, None], ones)

    def kernel_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """`expert_outputs` on the experts module's own inputs (what the observer sees at the experts
        boundary). The same function, except for families whose experts run in a projected space."""
        return self.expert_outputs(block, x, expert_ids)

    def lift_expert_outputs(self, block: nn.Module, raw: torch.Tensor) -> torch.Tensor:
        """Raw outputs as the experts module computes them [S, H'] -> in the block's output space [S, H].

        The identity, except for families whose experts run in a projected space (`expert_outputs`
        then includes the projections, and the observer records what this returns).
        """
        return raw

    def block_alone_refusal(self, block: nn.Module) -> str | None:
        """Why `block(hidden_states)` alone cannot run it (None: it can). Methods that re-run a block on
        probe vectors (merge fits, NAEE) are refused with this, in one line."""
        return None

    def remap_routing(self, block: nn.Module, M: torch.Tensor) -> None:
        """Rewrite routing state that names experts by id outside the expert-axis tensors for the merge
        matrix M [E_out, E_in] (DeepSeek-V4's hash table). Called by surgery before the block's tensors
        change, so it can read the old router. Nothing to do for most families."""

    def after_layer_plan(self, block: nn.Module, lp) -> None:
        """Bring what else in the decoder layer shares the block's expert count to `lp.num_experts_out`,
        after surgery applied the layer plan `lp` to the block (ERNIE-4.5-VL's vision experts); what it
        decides goes in `lp.notes`. Nothing for most families."""

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
        self.write_num_experts(self.config, new)
        model_text_config = text_config(model.config)
        if model_text_config is not self.config:
            self.write_num_experts(model_text_config, new)
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

    # ---- the layer walk: decoder layers run one at a time ---------------------------------------------
    # A family whose layers hand the next one more than its hidden states (ZAYA: router states) says how:
    # what a layer the walk passes over returns, how its output splits, and where the next layer takes it.
    def layer_passthrough(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        """What a decoder layer the walk passes over returns: its input hidden states."""
        return hidden_states

    def split_layer_output(self, out) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, L, H], state handed to the next layer or None) of a decoder layer's output."""
        return (out[0] if isinstance(out, tuple) else out), None

    def with_layer_state(self, args: tuple, kwargs: dict, state: torch.Tensor) -> tuple[tuple, dict]:
        """A decoder layer's call (`args`, `kwargs`) with the state the previous layer handed on."""
        return args, kwargs

    def carried_state(self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict,
                      state: torch.Tensor | None) -> torch.Tensor | None:
        """The state handed to the next layer, given this layer's call (input `hidden_states`, `args`,
        `kwargs`) and the state its output carried (`split_layer_output`): for a family whose model's loop,
        not the layer, builds that state (Inkling 2's `block_states`)."""
        return state

    def head_state(self, model: nn.Module, layers: nn.ModuleList, state: torch.Tensor | None):
        """A context in which the model's forward after its decoder layers reads `state`, the state the last
        layer handed on, where that code reads any (Inkling 2's final `block_states`)."""
        return contextlib.nullcontext()

    def check_method(self, method: str, options) -> None:
        """Refuse, in one line and before any work, a method (with its options) this family cannot run."""

    # ---- descriptions -------------------------------------------------------------------------
    def shared_expert_modules(self, block: nn.Module) -> list[str]:
        return [a for a in self.shared_attrs if isinstance(getattr(block, a, None), nn.Module)]
