"""Adapter subclasses for the families whose computation no transformers declaration describes.

Every other family is a row of `arch.facts.FAMILIES` over the derived `Adapter`.
"""

from __future__ import annotations

import contextlib
import copy
import types

import torch
from torch import nn

from moeprune.arch.base import (
    EXPERT_COUNT_ATTRS,
    Adapter,
    ExpertWeights,
    decoder_layers,
    has_low_rank_novices,
    novice_slots,
)
from moeprune.errors import MoepruneError


class Llama4Text(Adapter):
    """Llama 4 runs every expert densely on a score-scaled input: routed_in = sigmoid(score) * x.

    So an expert's contribution is E_i(g_i(x) x), not g_i(x) E_i(x). The observer records that
    contribution as the expert's output and `g_i(x)` as its gate; pruning and merging are exact
    operations on the weights regardless.
    """

    router_scores_index = 0  # Llama4Router returns (scores, logits); the logits index is recorded
    transposed = True  # its experts class is not dispatched, so it carries no layout flags
    dense_experts = True

    @torch.no_grad()
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        ex = self.experts(block)
        out = torch.zeros_like(x)  # [S, H]
        for e in expert_ids.unique().tolist():
            rows = (expert_ids == e).nonzero().squeeze(1)
            gate_up = x[rows] @ ex.gate_up_proj[e]  # [n, 2I]
            gate, up = gate_up.chunk(2, dim=-1)
            out[rows] = (up * ex.act_fn(gate)) @ ex.down_proj[e]
        return out

    # Llama 4's experts class is not dispatched through transformers' ALL_EXPERTS_FUNCTIONS (no
    # `use_experts_implementation`), so its novices run in an instance forward fed by a router hook.
    def install_novice_runtime(self, block: nn.Module) -> None:
        """The novice forward on the experts, and a router hook handing it each call's scores.

        The hook's handle is kept on the experts module; `remove_novice_runtime` removes both.
        """
        ex = self.experts(block)
        ex.forward = types.MethodType(_llama4_novice_forward, ex)
        keep_scores = types.MethodType(_llama4_keep_scores, ex)
        ex._moeprune_novice_hook = self.router(block).register_forward_hook(keep_scores)

    def remove_novice_runtime(self, block: nn.Module) -> None:
        ex = self.experts(block)
        ex.__dict__.pop("forward", None)
        handle = ex.__dict__.pop("_moeprune_novice_hook", None)
        if handle is not None:
            handle.remove()


def _llama4_keep_scores(self, router: nn.Module, args, output) -> None:
    """Router forward hook (bound to the experts module): hand this call's [T, E] scores to the experts."""
    self.__dict__["_moeprune_scores"] = output[0]


def _llama4_novice_forward(self, routed_in: torch.Tensor) -> torch.Tensor:
    """Llama 4 experts forward with novices: [E*T, H] score-scaled inputs -> [E*T, H] outputs.

    Llama 4 runs its experts densely on a score-scaled input (`E_i(g_i(x) x)`), and the observer
    records that scaled output as the expert's output, so a novice contributes its mean as is: kept
    experts run densely as usual; a novice's rows hold its vector for the tokens whose top-k holds it
    (score > 0; the router sets the others to sigmoid(-inf) = 0) and zero elsewhere.
    """
    if has_low_rank_novices(self):
        raise MoepruneError("Llama 4 runs its experts densely on score-scaled inputs, where a low-rank "
                            "novice (b + U Vᵀx) is not defined; use constant novices")
    scores = self.__dict__.pop("_moeprune_scores", None)  # [T, E]
    if scores is None:
        raise RuntimeError("Llama 4 novice experts need the router's scores: run the whole MoE block")
    T, E = scores.shape
    H = routed_in.shape[-1]
    kept_count, kept, novices = novice_slots(self)
    x = routed_in.view(E, T, H)
    out = routed_in.new_zeros(E, T, H)
    if kept_count:
        out[kept] = type(self).forward(self, x[kept].reshape(-1, H)).view(kept_count, T, H)
    routed = (scores[:, novices].T > 0).to(out.dtype)  # [n, T]
    out[novices] = routed[..., None] * self.novice_vectors.to(out.dtype)[:, None, :]
    return out.view(-1, H)


# plain text decoders and their wrappers
class HunYuanMoEV1(Adapter):
    """Hunyuan-A13B: `moe_topk` may be a per-layer list (each router reads its layer's entry).

    Pruning is the standard one (its router and experts are the usual softmax top-k and fused experts);
    the expert count is one int for every layer (its config type says so), and the top-k this adapter
    reports is the largest layer's, so an expert budget is checked against the layer that routes to the
    most experts.
    """

    top_k_field = "moe_topk"

    @property
    def top_k(self) -> int:
        value = getattr(self.config, self.top_k_field)
        return max(value) if isinstance(value, (list, tuple)) else int(value)


class DsaTopkCarry(Adapter):
    """DSA decoders (GLM-5, Mistral Large 4, Hy4) whose layers return (hidden states, top-k token indices)
    and take the previous layer's as `prev_topk_indices`: a "shared" indexer layer attends to the tokens
    the last full indexer layer chose. The walk hands each layer the indices its predecessor returned.

    Pruning is the standard one; the indexers are attention, untouched.
    """

    def layer_passthrough(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        # the model's loop unpacks two outputs; what a stand-in hands on is replaced by the real state
        return hidden_states, kwargs.get("prev_topk_indices")

    def split_layer_output(self, out) -> tuple[torch.Tensor, torch.Tensor | None]:
        return out[0], out[1]  # [B, L, H], [B, L, topk] token indices

    def with_layer_state(self, args: tuple, kwargs: dict, state: torch.Tensor) -> tuple[tuple, dict]:
        return args, {**kwargs, "prev_topk_indices": state}


# gemma4 and OCR/speech wrappers
class Gemma4Text(Adapter):
    """Gemma 4 (26B-A4B): the decoder layer is the MoE block, and it runs a dense MLP beside it.

    The router reads the residual stream x (it normalises it itself); the experts read
    `pre_feedforward_layernorm_2(x)`, and their sum passes `post_feedforward_layernorm_2` before it is
    added to the dense MLP's output. Gates are the softmax over all experts, top-k renormalised,
    times the selected expert's `per_expert_scale`. Pruning slices the experts, the router's
    projection rows and `per_expert_scale`; merging averages them like any router tensor. The dense
    MLP and every norm are untouched. The probe holds x; `expert_input` gives the experts' view of it.
    """

    expert_input_attr = "pre_feedforward_layernorm_2"

    def moe_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H] the experts' routed sum (before `post_feedforward_layernorm_2`) for the residual x.

        The decoder layer itself needs attention inputs, so its MoE lines are followed here: the same
        modules, called in the same order, on the same tensors.
        """
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        _, top_k_weights, top_k_index = self.router(block)(flat)  # [T, K], [T, K]
        out = self.experts(block)(self.expert_inputs(block, flat), top_k_index, top_k_weights)  # [T, H]
        return out.reshape(x.shape)


class Inkling2Text(Adapter):
    """Inkling 2: DeepSeek-V3-style routing (selection on score + correction bias, gates the selected
    scores renormalised, times `route_scale`) whose score is `scoring_func`: sigmoid by default,
    softmax possible. Pruning slices the experts, the router rows and the correction bias.

    Its decoder layers also read `block_states` [B, L, n, H], the inputs of the earlier attention-residual
    block boundaries (layers with `is_block_boundary`), which the model's loop, not the layer, grows and
    hands on, and which its final `final_input` reads before the norm. The layer walk does the same: it
    appends a boundary layer's input to the state it hands the next layer, and the head reads the last.
    """

    def with_layer_state(self, args: tuple, kwargs: dict, state: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "block_states": state}

    def carried_state(self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict,
                      state: torch.Tensor | None) -> torch.Tensor:
        block_states = args[0] if args else kwargs["block_states"]  # [B, L, n, H]
        if layer.is_block_boundary:  # as the model's loop: the layer's input joins the boundaries' inputs
            return torch.cat([block_states.to(hidden_states.device), hidden_states.unsqueeze(-2)], dim=-2)
        return block_states

    def head_state(self, model: nn.Module, layers: nn.ModuleList, state: torch.Tensor | None):
        text_model = next(m for m in model.modules() if getattr(m, "layers", None) is layers)
        if state is None:
            raise RuntimeError("Inkling 2's head reads the block states the last layer hands on; none given")

        def final_states(module, args, kwargs):
            # `final_input(block_states, hidden_states)`: the block states the walk carried, not the ones the
            # model's loop built from layers that passed their input through
            if args:
                return (state.to(args[0].device), *args[1:]), kwargs
            return args, {**kwargs, "block_states": state}

        return _pre_hooked(text_model.final_input, final_states)

    def survivors_exact(self) -> tuple[bool, str]:
        if getattr(self.config, "scoring_func", "sigmoid") == "sigmoid":
            return super().survivors_exact()
        return False, ("scoring_func is softmax and selection adds a correction bias: with fewer "
                       "experts the probabilities grow but the bias does not, so the choice among "
                       "survivors can change")


@contextlib.contextmanager
def _pre_hooked(module: nn.Module, hook):
    """`module` with the forward pre-hook `hook(module, args, kwargs) -> (args, kwargs)` while inside."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# hybrids: Mamba / linear attention
class NemotronH(Adapter):
    """Nemotron-H: non-gated relu² experts (`up_proj` -> act -> `down_proj`), optionally in a latent space.

    With `moe_latent_size` set, the block computes `fc2_latent_proj(experts(fc1_latent_proj(x)))`: one pair
    of projections [H -> D] and [D -> H] shared by every expert of the layer, around experts of width D.
    Pruning and merging act on the routed experts only, in that space; the projections, the router's
    surviving rows and the shared expert are kept as they are. fc2 is linear, so the routed output
    `fc2(sum_k g_k E_k(fc1 x))` of pruned or merged experts goes through the projections exactly as the
    originals' did. Statistics (expert outputs, their means, novice vectors) are in the experts'
    D-dimensional space; the probe keeps the router's H-dimensional inputs, mapped through fc1 when
    experts run on them.
    """

    @property
    def expert_dim(self) -> int:
        return int(getattr(self.config, "moe_latent_size", None) or self.config.hidden_size)

    def expert_inputs(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[n, H] block inputs -> [n, D]: the shared fc1 projection (an identity without a latent space)."""
        return block.fc1_latent_proj(x)

    def expert_outputs_to_block(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., H]: fc2's weight alone (its bias is added whatever the routing)."""
        fc2 = block.fc2_latent_proj
        return y @ fc2.weight.T.to(y.dtype) if isinstance(fc2, nn.Linear) else y


# new logic: dbrx, jetmoe, doge, zaya
class Dbrx(Adapter):
    """DBRX keeps its experts flat: `experts.mlp.w1`, `v1`, `w2` are [E*I, H] (gate, up, and down
    transposed), and its expert count and top-k sit in the nested `ffn_config`.

    Pruning and merging work on the [E, I, H] views of the three tensors and store the result flat
    again ([E'*I, H]); `ffn_config.moe_num_experts` becomes E' (the facts row names the nested fields),
    and the router's `layer.weight [E, H]` keeps the surviving rows. Its experts take the block's
    [B, L, H] input and return that shape, which the observer and the experts probe allow for.
    """

    transposed = False  # DbrxExperts is not dispatched, so it carries no layout flags
    interleaved = False
    FLAT = ("w1", "v1", "w2")  # tensors of `experts.mlp`, each [E*I, H]

    def moe_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        layers, _ = decoder_layers(model)
        return {i: layer.ffn for i, layer in enumerate(layers)}

    def expert_parameters(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """`mlp.w1`, `mlp.v1`, `mlp.w2` as [E, I, H] views of the flat parameters."""
        mlp = self.experts(block).mlp
        E = self.num_experts
        return {f"mlp.{n}": getattr(mlp, n).view(E, -1, getattr(mlp, n).shape[-1]) for n in self.FLAT}

    def set_expert_tensor(self, block: nn.Module, name: str, value: torch.Tensor, *,
                          parameter: bool = True) -> None:
        flat = value.reshape(-1, value.shape[-1])  # [E'*I, H]
        super().set_expert_tensor(block, name, flat, parameter=parameter)

    def expert_weights(self, block: nn.Module, e: int) -> ExpertWeights:
        t = self.expert_parameters(block)
        return ExpertWeights(gate=t["mlp.w1"][e], up=t["mlp.v1"][e], down=t["mlp.w2"][e].T)  # down [H, I]

    @torch.no_grad()
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        ex = self.experts(block)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)  # [S, 1]
        return type(ex).forward(ex, x, expert_ids[:, None], ones).reshape(x.shape)  # [S, 1, H] -> [S, H]

    def check_method(self, method: str, options) -> None:
        """Hidden-unit alignment and novices (MoNE) know only fused `gate_up_proj`/`down_proj` experts."""
        if method == "mone":
            raise MoepruneError("mone: novices need fused gate_up_proj/down_proj experts, and DBRX keeps its "
                                "experts flat (w1, v1, w2); use another method")
        if getattr(options, "align", False):
            raise MoepruneError(f"{method}: aligning hidden units needs fused gate_up_proj/down_proj "
                                "experts, and DBRX keeps them flat (w1, v1, w2); run it with align=false")

    def set_block_num_experts(self, block: nn.Module, old: int, new: int) -> None:
        super().set_block_num_experts(block, old, new)
        self.router(block).layer.out_features = new  # its Linear [E, H], as transformers builds it for E'


class Zaya(Adapter):
    """ZAYA's router scores E experts plus one skip class after them (a token routed there skips the MoE);
    it picks top-1 on softmax probabilities plus `balancing_biases` and masks a skip pick to expert 0 with
    gate 0.

    Pruning keeps the kept experts' rows of the router's `router_mlp.out_proj.weight [E+1, R]` and
    `balancing_biases [E+1]` and the skip class's last row as it is, so the skip class stays the class
    after the experts; `num_experts` becomes E'. The observer counts skip picks for no expert.
    """

    router_tensors = (("router_mlp.out_proj.weight", 0), ("balancing_biases", 0))
    skip_class = True

    # A ZAYA decoder layer takes the previous layer's router states [B, L, R] as its second argument and
    # returns (hidden states, its own router states); the layer walk carries them from layer to layer.
    def layer_passthrough(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        return hidden_states, args[0] if args else kwargs.get("prev_router_hidden_states")

    def split_layer_output(self, out) -> tuple[torch.Tensor, torch.Tensor | None]:
        return out[0], out[1]

    def with_layer_state(self, args: tuple, kwargs: dict, state: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "prev_router_hidden_states": state}

    def set_block_num_experts(self, block: nn.Module, old: int, new: int) -> None:
        super().set_block_num_experts(block, old, new)
        router = self.router(block)
        router.num_router_classes = new + 1
        router.router_mlp.out_proj.out_features = new + 1  # its Linear [E'+1, R], as transformers builds it
        # The router finds its skip class at `config.num_experts`, and one config serves every layer: a
        # block pruned alone (layer by layer, or a candidate copy) gets its own config with its own count.
        router.config = copy.copy(router.config)
        router.config.num_experts = new

    def router_logits(self, router_output, router: nn.Module | None = None) -> torch.Tensor:
        """[T, E]: the experts' logits, without the skip class's."""
        logits = super().router_logits(router_output, router)  # [T, E+1]
        return logits[..., :-1]


# new logic: longcat_flash, deepseek_v4, inkling, muse_spark
_NO_NOVICES_FIXED = ("its expert axis carries never-pruned rows past the routed experts, which MoNE's novice "
                     "format does not keep; use a prune or merge method")


class LongcatFlash(Adapter):
    """LongCat-Flash: Z zero-compute (identity) experts sit beside the E real ones.

    The router scores all E + Z (`classifier.weight [E+Z, H]`, `e_score_correction_bias [E+Z]`), and
    `experts.gate_up_proj` is allocated [E+Z, 2I, H] (its Z tail rows are never read) while `down_proj`
    is [E, H, I]; a top-k id >= E is an identity expert. Pruning or merging touches the E real experts
    only: the Z zero experts are never pruned, keep their router rows (moved to E_out..E_out+Z-1) and
    stay routable; `n_routed_experts` becomes E_out and `zero_expert_num` stays Z. The observer counts
    no statistics for pairs routed to a zero expert (they are not an expert's output), and its probe
    keeps the real experts' E logit columns.
    """

    count_field = "n_routed_experts"
    top_k_field = "moe_topk"
    router_attr = "router"
    router_tensors = (("classifier.weight", 0), ("classifier.bias", 0), ("e_score_correction_bias", 0))
    transposed = False  # not dispatched through transformers' experts functions: no layout flags
    interleaved = False
    novice_refusal = _NO_NOVICES_FIXED

    @property
    def fixed_experts(self) -> int:
        return int(getattr(self.config, "zero_expert_num", 0) or 0)

    def router_logits(self, router_output, router: nn.Module | None = None) -> torch.Tensor:
        """[T, E]: the real experts' logits (the probe, like the statistics, is about prunable experts)."""
        return super().router_logits(router_output, router)[..., : self.num_experts]

    @torch.no_grad()
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The family's kernel, pair by pair (its forward squeezes a top-1 call's K axis away): [S, H]."""
        ex = self.experts(block)
        out = x.clone()  # ids >= E are zero-compute experts: the identity
        for e in expert_ids.unique().tolist():
            if e >= ex.num_routed_experts:
                continue
            rows = (expert_ids == e).nonzero().squeeze(1)
            gate, up = torch.nn.functional.linear(x[rows], ex.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            out[rows] = torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[e])
        return out

    def set_block_num_experts(self, block: nn.Module, old: int, new: int) -> None:
        super().set_block_num_experts(block, old, new)
        Z = self.fixed_experts
        ex, router = self.experts(block), self.router(block)
        ex.num_routed_experts, ex.total_experts = new, new + Z
        router.num_experts, router.n_routed_experts = new, new + Z  # the router's `n_routed_` is E + Z
        router.classifier.out_features = new + Z


class InklingText(Adapter):
    """Inkling: one router matrix scores the E routed experts, then the S shared experts.

    `gate.weight` is [E + S, H] with the shared experts' rows last; the correction bias is [E]. Routed
    experts are chosen on sigmoid + bias over the first E rows; the gates normalise the selected and
    the shared experts' sigmoids over those k + S alone. Pruning or merging slices or merges the first
    E rows only; the S shared rows are kept bit-identical after the E_out new ones (and the shared
    experts themselves are untouched), so `n_routed_experts` becomes E_out and `n_shared_experts` stays.
    """

    router_attr = "gate"
    router_tensors = (("weight", 0), ("e_score_correction_bias", 0))
    novice_refusal = _NO_NOVICES_FIXED

    def set_block_num_experts(self, block: nn.Module, old: int, new: int) -> None:
        super().set_block_num_experts(block, old, new)
        router = self.router(block)
        router.num_experts = new
        router.n_total_experts = new + router.n_shared_experts


_HASH_BLOCK = ("a DeepSeek-V4 hash-routed block picks its experts from the token ids, which a method "
               "re-running it on probe vectors does not have; use a method that reads statistics only "
               "(frequency, routing_score, ean, reap, random)")


class DeepseekV4(Adapter):
    """DeepSeek-V4: the first `hash_moe` layers pick experts from a frozen table, `tid2eid[input_ids]`.

    `gate.tid2eid [V, K]` (hash layers only) names old expert ids; pruning or merging rewrites it
    through the old -> new expert map (done before the router changes, `remap_routing`):
    - an expert merged into a group becomes that group's new id (a token whose two hashed experts
      merged into one gets that expert twice, i.e. all of its routed gate, as the sum it replaces);
    - a pruned expert becomes the surviving expert whose router row (`gate.weight`, cosine) is most
      similar to the pruned expert's, among those not already in that token's row, so a token keeps
      K distinct experts.
    A token whose hashed experts all survive keeps exactly its experts and gates. The learned top-k
    layers are DeepSeek-V3-style (per-expert score + correction bias, renormalised). Hash blocks
    take `input_ids`, so methods that re-run a block on probe vectors alone cannot run them.
    """

    @property
    def novice_refusal(self) -> str | None:
        if "hash_moe" not in (getattr(self.config, "mlp_layer_types", None) or ()):
            return None
        return ("its hash-routed layers name experts in a token table (tid2eid) that a stock checkpoint "
                "with novices cannot keep; use a prune or merge method")

    def check_method(self, method: str, options) -> None:
        """Before any work: the methods that re-run a block on probe vectors (NAEE's subset search, learned
        merge coefficients) cannot run a hash-routed block, which takes the token ids."""
        if "hash_moe" not in (getattr(self.config, "mlp_layer_types", None) or ()):
            return
        if method == "naee" or getattr(options, "coefficients", None) == "learned":
            what = "naee" if method == "naee" else f"{method} coefficients=learned"
            raise MoepruneError(f"{what}: {_HASH_BLOCK}")

    def block_alone_refusal(self, block: nn.Module) -> str | None:
        if getattr(block, "is_hash", False):
            return _HASH_BLOCK
        return None

    @torch.no_grad()
    def remap_routing(self, block: nn.Module, M: torch.Tensor) -> None:
        router = self.router(block)
        table = getattr(router, "tid2eid", None)  # [V, K]
        if not isinstance(table, torch.Tensor):
            return
        table[:] = hash_table_remap(table, M, router.weight)


def hash_table_remap(table: torch.Tensor, M: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """table [V, K] of old expert ids -> new ids for merge matrix M [E_out, E_in] (see `DeepseekV4`).

    router_weight: the old router [E_in, H]; the new experts' rows are M @ it (the kept rows when pruning).
    """
    E_out, E_in = M.shape
    member = M != 0  # [E_out, E_in]
    new_of = torch.where(member.any(0), (M.abs() * member).argmax(0), -1)  # [E_in], -1: pruned
    W = router_weight.detach().double().cpu()  # [E_in, H]
    W_new = M.to(W.dtype) @ W  # [E_out, H]
    unit = torch.nn.functional.normalize
    sim = unit(W, dim=1) @ unit(W_new, dim=1).T  # [E_in, E_out] cosine
    old = table.long().cpu()
    mapped = new_of[old]  # [V, K]
    for k in range(old.shape[1]):
        rows = (mapped[:, k] < 0).nonzero().squeeze(1)  # [n] tokens whose k-th hashed expert was pruned
        if not rows.numel():
            continue
        score = sim[old[rows, k]].clone()  # [n, E_out]
        present = mapped[rows]  # [n, K]: the token's other experts, already new ids (-1: pruned too)
        has = present >= 0
        token = torch.arange(rows.numel())[:, None].expand_as(present)
        score[token[has], present[has]] = -torch.inf
        mapped[rows, k] = score.argmax(1)
    return mapped.to(device=table.device, dtype=table.dtype)


class MuseSpark(Adapter):
    """Muse Spark: the experts run in a projected space of width H' (`moe_hidden_size`).

    block(x) = post_expert_proj( sum_k g_k E_k( pre_expert_norm(pre_expert_proj(x)) ) ), the router reading
    x itself. The projections and norms are shared and `post_expert_proj` is linear, so each expert's
    output in the block's space is F_k(x) = post_expert_proj(E_k(norm(pre_proj(x)))) and the block is
    sum_k g_k F_k(x) exactly: `expert_outputs` computes F_k on hidden-space inputs [S, H] and the observer
    records F_k (`lift_expert_outputs`). Pruning and merging act on the experts' own [E, ...] tensors;
    the projections, norms and the experts' shared `post_expert_norm` are untouched.
    """

    novice_refusal = ("its experts run in a projected space, where a novice's mean output (recorded in the "
                      "block's space) cannot be added; use a prune or merge method")

    def kernel_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return Adapter.expert_outputs(self, block, x, expert_ids)  # [S, H'] on projected inputs [S, H']

    @torch.no_grad()
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        z = block.pre_expert_norm(block.pre_expert_proj(x))  # [S, H']
        return block.post_expert_proj(self.kernel_outputs(block, z, expert_ids))  # [S, H]

    def lift_expert_outputs(self, block: nn.Module, raw: torch.Tensor) -> torch.Tensor:
        return block.post_expert_proj(raw.to(block.post_expert_proj.weight.dtype))  # [S, H'] -> [S, H]


# ---- ERNIE-4.5-VL ---------------------------------------------------------------------------------
class _Link:
    """A reference from a text MoE to the block that holds it, not registered as a submodule.

    A deep copy of the whole decoder layer (the layer walk's working copy, the meta skeleton's pristine
    copy) links the copies; a deep copy of the text MoE alone (candidate evaluations) links nothing, so
    surgery on such a copy never reaches the model's vision experts.
    """

    def __init__(self, module: nn.Module | None):
        self.module = module

    def __deepcopy__(self, memo):
        return _Link(memo.get(id(self.module)))


class Ernie45VL(Adapter):
    """ERNIE-4.5-VL: each decoder MoE layer holds a text MoE (run on text tokens) and a vision MoE (run on
    image and video tokens) under one expert count, `moe_num_experts`, which is also the width of the
    layer's router logits, so both must hold the same E'.

    The text MoE is the block moeprune observes and plans (text calibration only reaches it). After its
    plan, the vision MoE of the same layer is pruned to the same E' by a weight-only rule: it keeps the E'
    vision experts with the lowest `e_score_correction_bias` in its router's `moe_statics` (ties by expert
    index). Under auxiliary-loss-free balancing that bias rises for under-used experts, so a low bias marks
    a much-used expert. The vision router's rows, bias and experts are sliced with that keep set; the
    vision MoE is pruned, never merged, even when the text plan merges. Image quality is not measured.
    """

    def moe_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        blocks = super().moe_blocks(model)
        layers, _ = decoder_layers(model)
        for i, block in blocks.items():
            for module in layers[i].modules():
                if getattr(module, "text_moe", None) is block and isinstance(
                        getattr(module, "vision_moe", None), nn.Module):
                    block._moeprune_moe_block = _Link(module)
        return blocks

    @staticmethod
    def vision_keep(vision: nn.Module, num_out: int) -> torch.Tensor:
        """[E'] the vision experts kept: the lowest correction biases, ties by index, in index order."""
        bias = vision.gate.moe_statics.e_score_correction_bias.detach().float().reshape(-1).cpu()  # [E]
        order = torch.argsort(bias, stable=True)  # equal biases stay in index order
        return order[:num_out].sort().values

    @torch.no_grad()
    def after_layer_plan(self, block: nn.Module, lp) -> None:
        """Prune the vision MoE beside `block` (the text MoE) to the plan's E'; its kept experts go in the
        plan's notes. A copy of the text MoE alone has no vision MoE beside it: nothing to do."""
        num_in, num_out = lp.num_experts_in, lp.num_experts_out
        link = getattr(block, "_moeprune_moe_block", None)
        holder = link.module if link is not None else None
        if holder is None or getattr(holder, "text_moe", None) is not block or num_out == num_in:
            return
        vision = holder.vision_moe
        keep = self.vision_keep(vision, num_out)
        lp.notes["vision_experts_kept"] = keep.tolist()  # weight-only: the lowest correction biases
        for module in vision.modules():
            for store in (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if t is None or num_in not in t.shape:
                        continue
                    axis = list(t.shape).index(num_in)  # gate.weight [E, H], bias [1, E], experts [E, ...]
                    sliced = t.index_select(axis, keep.to(t.device)).contiguous()
                    store[name] = nn.Parameter(sliced, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else sliced
        for module in holder.modules():  # the holder's, the vision router's and experts' cached counts
            for attr in EXPERT_COUNT_ATTRS:
                if getattr(module, attr, None) == num_in and not isinstance(getattr(module, attr), bool):
                    setattr(module, attr, num_out)
