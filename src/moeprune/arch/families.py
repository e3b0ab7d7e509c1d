"""The adapters of the 11 transformers families with routed experts (transformers 5.23).

Each class states only what differs from the `Adapter` defaults; see docs/architecture.md ("Families") for the
table of expert-count fields and routing notes these facts come from.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from moeprune.arch.base import Adapter, novice_slots

_SOFTMAX_NO_RENORM = (
    "gates are softmax probabilities over all E experts without renormalisation, so removing any "
    "expert enlarges every surviving gate"
)


class _SoftmaxTopK(Adapter):
    """Softmax over all experts, top-k, optional renormalisation (`norm_topk_prob`)."""

    def survivors_exact(self):
        if getattr(self.config, "norm_topk_prob", False):
            return super().survivors_exact()
        return False, _SOFTMAX_NO_RENORM


class Mixtral(Adapter):
    model_types = ("mixtral",)
    count_field = "num_local_experts"


class Qwen2Moe(_SoftmaxTopK):
    model_types = ("qwen2_moe",)
    count_field = "num_experts"


class Qwen3Moe(_SoftmaxTopK):
    model_types = ("qwen3_moe",)
    count_field = "num_local_experts"


class Olmoe(_SoftmaxTopK):
    model_types = ("olmoe",)
    count_field = "num_experts"


class DeepseekV2(Adapter):
    model_types = ("deepseek_v2",)
    count_field = "n_routed_experts"
    min_experts_per_group = 1  # a group is scored by its best expert

    @property
    def group_limited(self) -> bool:
        return getattr(self.config, "topk_method", "greedy") == "group_limited_greedy"

    def survivors_exact(self):
        return False, "DeepSeek-V2 ignores norm_topk_prob: " + _SOFTMAX_NO_RENORM


class DeepseekV3(Adapter):
    model_types = ("deepseek_v3",)
    count_field = "n_routed_experts"
    group_limited = True

    def survivors_exact(self):
        topk_group = int(getattr(self.config, "topk_group", 1) or 1)
        if self.n_group > 1 and not (topk_group == 1 and self.top_k >= 2):
            return False, (
                "a group's score is the sum of its top-2 experts, so pruning a selected group's second "
                "expert can change which groups are eligible; exact when n_group == 1, or topk_group == 1 "
                "with top-k >= 2"
            )
        if not getattr(self.config, "norm_topk_prob", True):
            return True, "sigmoid gates do not depend on the other experts"
        return super().survivors_exact()


class Glm4Moe(DeepseekV3):
    model_types = ("glm4_moe",)


class Phimoe(Adapter):
    model_types = ("phimoe",)
    count_field = "num_local_experts"
    router_attr = "router"

    def survivors_exact(self):
        return False, (
            "sparsemixer masks each pick by its distance to the running maximum relative to all "
            "logits, and its second pick is a softmax over the remaining experts"
        )


class GptOss(Adapter):
    model_types = ("gpt_oss",)
    count_field = "num_local_experts"
    router_attr = "router"
    transposed = True
    interleaved = True


class Ernie45Moe(Adapter):
    model_types = ("ernie4_5_moe",)
    count_field = "moe_num_experts"
    top_k_field = "moe_k"
    router_tensors = (("weight", 0), ("moe_statics.e_score_correction_bias", 1))

    def survivors_exact(self):
        return False, (
            "selection ranks softmax probabilities plus e_score_correction_bias; with fewer experts the "
            "probabilities grow but the bias does not, so the choice among survivors can change"
        )


class Llama4Text(Adapter):
    """Llama 4 runs every expert densely on a score-scaled input: routed_in = sigmoid(score) * x.

    So an expert's contribution is E_i(g_i(x) x), not g_i(x) E_i(x). The observer records that
    contribution as the expert's output and `g_i(x)` as its gate; pruning and merging are exact
    operations on the weights regardless.
    """

    model_types = ("llama4_text",)
    count_field = "num_local_experts"
    router_attr = "router"
    router_logits_index = 1  # Llama4Router returns (scores, logits)
    router_scores_index = 0
    transposed = True
    dense_experts = True

    def survivors_exact(self):
        return True, "gates are sigmoids of each selected expert's own logit"

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


ADAPTERS: tuple[type[Adapter], ...] = (
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
    Glm4Moe,
    Phimoe,
    GptOss,
    Ernie45Moe,
    Llama4Text,
)
