"""Per-family facts that no transformers declaration carries, as one table.

Everything else an adapter needs (the expert count and top-k fields, the router and its logits, the
experts layout, every tensor along the expert axis) is derived from the model by `arch.base.Adapter`.
A row says how the family's gates are formed, which decides whether a token whose top-k all survive
pruning gets exactly the same output (`ROUTING`), and how group-limited routing scores a group.

Columns:
- `model_types`: the text model_type first, then the multimodal (or wrapper) types that hold it;
- `routing`: a key of `ROUTING`;
- `groups`: None (no group-limited routing), "max" (a group is scored by its best expert: DeepSeek-V2,
  only when `topk_method == "group_limited_greedy"`) or "top2" (by the sum of its two best:
  DeepSeek-V3 and its descendants, whenever `n_group > 1`);
- `adapter`: an `Adapter` subclass for the few families whose computation differs (Llama 4);
- `count_field` / `top_k_field`: only where the derived field is wrong (an alias that does not set).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprune.arch.base import Adapter
from moeprune.arch.families import Gemma4Text, Inkling2Text, Llama4Text

_RENORM = "top-k weights are renormalised over the selected experts"
_NO_RENORM = ("gates are softmax probabilities over all E experts without renormalisation, so removing any "
              "expert enlarges every surviving gate")


def _softmax_topk(adapter) -> tuple[bool, str]:
    return True, _RENORM


def _softmax_norm_flag(adapter) -> tuple[bool, str]:
    if getattr(adapter.config, "norm_topk_prob", False):
        return True, _RENORM
    return False, _NO_RENORM


def _softmax_no_renorm(adapter) -> tuple[bool, str]:
    return False, _NO_RENORM


def _sigmoid_bias(adapter) -> tuple[bool, str]:
    """Sigmoid gates, selection on gate + correction bias, optional renormalisation (DeepSeek-V3)."""
    cfg = adapter.config
    if adapter.n_group > 1 and adapter.min_experts_per_group > 1:
        topk_group = int(getattr(cfg, "topk_group", 1) or 1)
        if not (topk_group == 1 and adapter.top_k >= 2):
            return False, ("a group's score is the sum of its top-2 experts, so pruning a selected group's "
                           "second expert can change which groups are eligible; exact when n_group == 1, or "
                           "topk_group == 1 with top-k >= 2")
    if not getattr(cfg, "norm_topk_prob", True):
        return True, "sigmoid gates do not depend on the other experts"
    return True, _RENORM


def _softmax_plus_bias(adapter) -> tuple[bool, str]:
    return False, ("selection ranks softmax probabilities plus a correction bias; with fewer experts the "
                   "probabilities grow but the bias does not, so the choice among survivors can change")


def _sparsemixer(adapter) -> tuple[bool, str]:
    return False, ("sparsemixer masks each pick by its distance to the running maximum relative to all "
                   "logits, and its second pick is a softmax over the remaining experts")


def _sigmoid_each(adapter) -> tuple[bool, str]:
    return True, "gates are sigmoids of each selected expert's own logit"


# How a family forms its gates -> (surviving routes exact?, why).
ROUTING = {
    "softmax_topk": _softmax_topk,  # softmax over the top-k logits only (Mixtral)
    "softmax_norm_topk_prob": _softmax_norm_flag,  # softmax over all, top-k, renormalised iff norm_topk_prob
    "softmax_no_renorm": _softmax_no_renorm,  # softmax over all, top-k, never renormalised (DeepSeek-V2)
    "sigmoid_bias": _sigmoid_bias,  # sigmoid + correction bias for selection (DeepSeek-V3)
    "softmax_plus_bias": _softmax_plus_bias,  # softmax + correction bias for selection (ERNIE 4.5)
    "sparsemixer": _sparsemixer,  # Phi-MoE
    "sigmoid_each": _sigmoid_each,  # each selected expert's own sigmoid (Llama 4)
}


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    routing: str
    groups: str | None = None
    adapter: type[Adapter] | None = None
    count_field: str | None = None
    top_k_field: str | None = None

    def __post_init__(self):
        if self.routing not in ROUTING or self.groups not in (None, "max", "top2"):
            raise ValueError(f"{self.model_types}: unknown routing {self.routing!r} or groups "
                             f"{self.groups!r}")

    def rule(self, adapter) -> tuple[bool, str]:
        """(surviving routes exact?, why) for `adapter`'s config."""
        return ROUTING[self.routing](adapter)


FAMILIES: tuple[Family, ...] = (
    # model types                 routing                  groups  adapter / field overrides
    Family(("mixtral",), "softmax_topk", count_field="num_local_experts"),
    Family(("qwen2_moe",), "softmax_norm_topk_prob"),
    Family(("qwen3_moe",), "softmax_norm_topk_prob", count_field="num_local_experts"),
    Family(("olmoe",), "softmax_norm_topk_prob"),
    Family(("deepseek_v2",), "softmax_no_renorm", "max"),
    Family(("deepseek_v3",), "sigmoid_bias", "top2"),
    Family(("glm4_moe",), "sigmoid_bias", "top2"),
    Family(("phimoe",), "sparsemixer", count_field="num_local_experts"),
    Family(("gpt_oss",), "softmax_topk", count_field="num_local_experts"),
    Family(("ernie4_5_moe",), "softmax_plus_bias", count_field="moe_num_experts", top_k_field="moe_k"),
    Family(("llama4_text", "llama4"), "sigmoid_each", adapter=Llama4Text, count_field="num_local_experts"),
    # text decoders with standard fused experts (A)
    Family(("afmoe",), "sigmoid_bias"),  # sigmoid + block expert_bias for selection, renormalised
    Family(("aria_text", "aria"), "softmax_topk"),
    Family(("cohere2_moe",), "softmax_topk"),  # softmax, or sigmoid (+ renorm), over the top-k logits
    Family(("exaone_moe",), "sigmoid_bias", "top2"),
    Family(("flint",), "sigmoid_bias"),  # sigmoid of the top-k, renormalised iff norm_topk_prob
    Family(("granitemoe",), "softmax_topk"),
    Family(("granitemoe_swa",), "softmax_topk"),
    Family(("granitemoeshared",), "softmax_topk"),
    Family(("mellum",), "softmax_norm_topk_prob"),
    Family(("minimax",), "softmax_topk"),  # softmax over all, top-k, always renormalised
    Family(("minimax_m2",), "sigmoid_bias"),
    Family(("solar_open",), "sigmoid_bias", "top2"),
    Family(("beam",), "sigmoid_bias", "top2"),
    Family(("mimo_v2_flash",), "sigmoid_bias", "top2"),
    Family(("laguna",), "sigmoid_bias"),  # softcapped logits, sigmoid, bias for selection, renormalised
    Family(("hy_v3",), "sigmoid_bias"),
    Family(("kolibri1",), "sigmoid_bias"),  # selection on logits + bias, sigmoid gates of the selected
    # text decoders with standard fused experts (B)
    Family(("dots1",), "sigmoid_bias", "top2"),
    Family(("deepseek_v32",), "sigmoid_bias", "top2"),
    Family(("glm4_moe_lite",), "sigmoid_bias", "top2"),
    Family(("glm_moe_dsa",), "sigmoid_bias", "top2"),  # GLM-5: DeepSeek-V3 router, DSA attention
    # hybrids: linear attention / Mamba layers (C)
    Family(("qwen3_next",), "softmax_norm_topk_prob"),
    Family(("qwen3_5_moe_text", "qwen3_5_moe"), "softmax_topk"),  # softmax, top-k, always renormalised
    # vision-language and omni checkpoints (D)
    Family(("qwen3_vl_moe",), "softmax_topk"),  # softmax, top-k, always renormalised

    # [text] plain text decoders and their wrappers
    # [/text]

    # [vlm] vision-language / omni checkpoints
    # [/vlm]

    # [gemma] gemma4 and OCR/speech wrappers
    # Gemma 4: softmax over all experts, top-k renormalised, then times the expert's own
    # per_expert_scale (a router tensor along E, sliced with it); the decoder layer is the MoE block.
    Family(("gemma4_text", "gemma4"), "softmax_topk", adapter=Gemma4Text, top_k_field="top_k_experts"),
    # Inkling 2: score (sigmoid by default) + correction bias for selection, selected scores
    # renormalised, times route_scale; a softmax scoring_func is not exact (the adapter says so)
    Family(("inkling2_text", "inkling2"), "sigmoid_bias", adapter=Inkling2Text),
    # dots.3 note: DeepSeek-V3 router (sigmoid + correction bias, groups scored by their top-2); its
    # vision tower's experts are not the language model's and are left as they are
    Family(("dots3_note_text", "dots3_note"), "sigmoid_bias", "top2"),
    # DeepSeek-OCR 2 and Unlimited-OCR: DeepSeek-V2 decoders (softmax over all, top-k, never
    # renormalised; groups scored by their best expert under group_limited_greedy). Their text
    # model_types have no model class in transformers, so only the OCR checkpoints are rows.
    Family(("deepseek_ocr2",), "softmax_no_renorm", "max"),
    Family(("unlimited_ocr",), "softmax_no_renorm", "max"),
    # [/gemma]

    # [hybrid] hybrids: Mamba / linear attention
    # [/hybrid]

    # [logic1] new logic: dbrx, jetmoe, doge, zaya
    # [/logic1]

    # [logic2] new logic: longcat_flash, deepseek_v4, inkling, muse_spark
    # [/logic2]
)
BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
