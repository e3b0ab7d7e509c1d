"""Adapter subclasses for the families whose computation no transformers declaration describes.

Every other family is a row of `arch.facts.FAMILIES` over the derived `Adapter`.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from moeprune.arch.base import Adapter, ExpertWeights, decoder_layers, novice_slots
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


# [text] plain text decoders and their wrappers
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
# [/text]


# [vlm] vision-language / omni checkpoints
# [/vlm]


# [gemma] gemma4 and OCR/speech wrappers
# [/gemma]


# [hybrid] hybrids: Mamba / linear attention
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


# [/hybrid]


# [logic1] new logic: dbrx, jetmoe, doge, zaya
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
# [/logic1]


# [logic2] new logic: longcat_flash, deepseek_v4, inkling, muse_spark
# [/logic2]
