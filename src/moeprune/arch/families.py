"""Adapter subclasses for the families whose computation no transformers declaration describes.

Every other family is a row of `arch.facts.FAMILIES` over the derived `Adapter`.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from moeprune.arch.base import Adapter, novice_slots


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
# [/text]


# [vlm] vision-language / omni checkpoints
# [/vlm]


# [gemma] gemma4 and OCR/speech wrappers
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
        out = self.experts(block)(self.expert_input(block, flat), top_k_index, top_k_weights)  # [T, H]
        return out.reshape(x.shape)


class Inkling2Text(Adapter):
    """Inkling 2: DeepSeek-V3-style routing (selection on score + correction bias, gates the selected
    scores renormalised, times `route_scale`) whose score is `scoring_func`: sigmoid by default,
    softmax possible. Pruning slices the experts, the router rows and the correction bias.

    Its decoder layers also read `block_states`, the inputs of the earlier attention-residual block
    boundaries, which the model's loop carries between layers; calibration, which runs one layer at a
    time, would give them the wrong ones, so only weight-only methods can plan it.
    """

    layer_state_carried = ("its decoder layers read the inputs of earlier layers (block attention "
                           "residuals, `block_states`), which the model's own loop carries between layers")

    def survivors_exact(self) -> tuple[bool, str]:
        if getattr(self.config, "scoring_func", "sigmoid") == "sigmoid":
            return super().survivors_exact()
        return False, ("scoring_func is softmax and selection adds a correction bias: with fewer "
                       "experts the probabilities grow but the bias does not, so the choice among "
                       "survivors can change")
# [/gemma]


# [hybrid] hybrids: Mamba / linear attention
# [/hybrid]


# [logic1] new logic: dbrx, jetmoe, doge, zaya
# [/logic1]


# [logic2] new logic: longcat_flash, deepseek_v4, inkling, muse_spark
# [/logic2]
