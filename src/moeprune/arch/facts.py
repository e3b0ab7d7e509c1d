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
- `count_field` / `top_k_field`: only where the derived field is wrong (an alias that does not set);
- `refused`: for a family moeprune cannot keep valid after pruning, the one line saying why (it is then
  not supported, and `get_adapter` raises it before any work).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprune.arch.base import Adapter
from moeprune.arch.families import (
    Dbrx,
    DeepseekV4,
    DsaTopkCarry,
    Ernie45VL,
    Gemma4Text,
    HunYuanMoEV1,
    Inkling2Text,
    InklingText,
    Llama4Text,
    LongcatFlash,
    MuseSpark,
    NemotronH,
    Zaya,
)

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


def _softmax_pnorm(adapter) -> tuple[bool, str]:
    """DBRX: softmax over all, top-k, divided by the selected p-norm (p = moe_normalize_expert_weights)."""
    if getattr(adapter.config.ffn_config, "moe_normalize_expert_weights", None) is None:
        return False, _NO_RENORM
    return True, ("top-k weights are divided by their p-norm (moe_normalize_expert_weights), in which the "
                  "softmax normaliser over all experts cancels")


def _sigmoid_with_shared(adapter) -> tuple[bool, str]:
    return True, ("selection is each routed expert's sigmoid plus its correction bias; the gates normalise "
                  "the selected and the shared experts' sigmoids over those alone")


def _softmax_groups(adapter) -> tuple[bool, str]:
    """Softmax over all E, groups scored by their top-2 probabilities, top-k, renormalised iff
    `norm_topk_prob` (Mistral 4). Removing experts scales every surviving probability of a token by one
    factor, so rankings hold; the group rule is DeepSeek-V3's."""
    if not getattr(adapter.config, "norm_topk_prob", True):
        return False, _NO_RENORM
    return _sigmoid_bias(adapter)  # renormalised here, so only the group rule can break exactness


# How a family forms its gates -> (surviving routes exact?, why).
ROUTING = {
    "softmax_topk": _softmax_topk,  # softmax over the top-k logits only (Mixtral)
    "softmax_norm_topk_prob": _softmax_norm_flag,  # softmax over all, top-k, renormalised iff norm_topk_prob
    "softmax_no_renorm": _softmax_no_renorm,  # softmax over all, top-k, never renormalised (DeepSeek-V2)
    "sigmoid_bias": _sigmoid_bias,  # sigmoid + correction bias for selection (DeepSeek-V3)
    "softmax_plus_bias": _softmax_plus_bias,  # softmax + correction bias for selection (ERNIE 4.5)
    "sparsemixer": _sparsemixer,  # Phi-MoE
    "sigmoid_each": _sigmoid_each,  # each selected expert's own sigmoid (Llama 4)
    "softmax_pnorm": _softmax_pnorm,  # softmax, top-k, divided by the top-k's p-norm (DBRX)
    "sigmoid_with_shared": _sigmoid_with_shared,  # gates normalised with the shared experts' (Inkling)
    "softmax_groups": _softmax_groups,  # softmax, top-2 group scores, top-k, renorm (Mistral 4)
}


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    routing: str | None = None
    groups: str | None = None
    adapter: type[Adapter] | None = None
    count_field: str | None = None
    top_k_field: str | None = None
    refused: str | None = None

    def __post_init__(self):
        known = self.routing in ROUTING or (self.refused is not None and self.routing is None)
        if not known or self.groups not in (None, "max", "top2"):
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
    Family(("glm_moe_dsa",), "sigmoid_bias", "top2", adapter=DsaTopkCarry),  # GLM-5: DSA attention
    # hybrids: linear attention / Mamba layers (C)
    Family(("qwen3_next",), "softmax_norm_topk_prob"),
    Family(("qwen3_5_moe_text", "qwen3_5_moe"), "softmax_topk"),  # softmax, top-k, always renormalised
    # vision-language and omni checkpoints (D)
    Family(("qwen3_vl_moe_text", "qwen3_vl_moe"), "softmax_topk"),  # softmax, top-k, always renormalised

    # plain text decoders and their wrappers
    Family(("axk1",), "sigmoid_bias", "top2"),  # DeepSeek-V3 router; post-MoE norm on the block output
    Family(("axk2",), "sigmoid_bias", "top2"),  # DeepSeek-V3 router, groups optional (n_group None: none)
    Family(("flex_olmo",), "softmax_norm_topk_prob"),
    Family(("hunyuan_v1_moe",), "softmax_topk", adapter=HunYuanMoEV1),  # softmax, top-k, always renormalised
    Family(("hy_v4",), "sigmoid_bias", "top2", adapter=DsaTopkCarry),  # GLM-4.7-Flash router
    Family(("lfm2_moe",), "sigmoid_bias"),  # sigmoid, block expert_bias for selection, renorm iff flag
    Family(("step3p7",), "sigmoid_bias"),  # sigmoid, correction bias for selection, always renormalised
    Family(("qwen4_exp_text", "qwen4_exp"), "softmax_norm_topk_prob"),
    Family(("minimax_m3_vl_text", "minimax_m3_vl"), "sigmoid_bias"),  # as step3p7
    Family(("mistral4", "mistral3"), "softmax_groups", "top2"),  # mistral3: Mistral Small 4 (text mistral4)
    Family(("mistral_large4",), "softmax_groups", "top2", adapter=DsaTopkCarry),  # text alone: no class

    # vision-language / omni checkpoints
    Family(("glm4v_moe_text", "glm4v_moe"), "sigmoid_bias", "top2"),  # GLM-4.5V: glm4_moe's router
    # GLM-5-Next: DeepSeek-V3 router; linear (KDA) and indexed attention, hyper-connection streams
    Family(("glm5_next_text", "glm5_next"), "sigmoid_bias", "top2", adapter=DsaTopkCarry),
    Family(("kimi_k25",), "sigmoid_bias", "top2"),  # Kimi-K2.5: a deepseek_v3 text config, vision tower
    # Qwen3-Omni: the thinker's text decoder is pruned; the talker's MoE (qwen3_omni_moe_talker_text) and
    # code predictor, the vision and audio towers and code2wav are written untouched
    Family(("qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "qwen3_omni_moe"), "softmax_norm_topk_prob"),
    # ERNIE-4.5-VL: every decoder MoE layer holds text experts and vision experts (run on image and video
    # tokens) under one count: the text MoE is planned, the vision MoE keeps the same number of experts by
    # the lowest correction bias (the adapter); the text router is softmax + correction bias for selection
    Family(("ernie4_5_vl_moe_text", "ernie4_5_vl_moe"), "softmax_plus_bias", adapter=Ernie45VL,
           count_field="moe_num_experts", top_k_field="moe_k"),

    # gemma4 and OCR/speech wrappers
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

    # hybrids: Mamba / linear attention
    Family(("jamba",), "softmax_no_renorm"),  # softmax over all, top-k, never renormalised
    Family(("granitemoehybrid",), "softmax_topk"),  # softmax over the top-k logits
    Family(("kimi_linear",), "sigmoid_bias", "top2"),
    Family(("bailing_hybrid",), "sigmoid_bias", "top2"),
    Family(("nemotron_h", "nemotron_h_omni", "nemo_speechlm"), "sigmoid_bias", "top2", adapter=NemotronH),

    # new logic: dbrx, jetmoe, doge, zaya
    Family(("dbrx",), "softmax_pnorm", adapter=Dbrx, count_field="ffn_config.moe_num_experts",
           top_k_field="ffn_config.moe_top_k"),
    Family(("zaya",), "softmax_no_renorm", adapter=Zaya),  # top-1 of softmax(E experts + skip) + bias
    Family(("jetmoe",), refused=(
        "its MLP experts and its mixture-of-attention experts share one count (num_local_experts), so a "
        "checkpoint with fewer MLP experts but all attention experts does not load; moeprune prunes MLP "
        "experts only")),
    Family(("doge",), refused=(
        "its routed experts are product keys (expert x*num_keys + y is scored by key x plus key y, "
        "num_experts = num_keys**2), so dropping single experts leaves cells the router still picks; only "
        "whole keys could go, which per-expert plans cannot express (with is_moe=false it has no routed "
        "experts at all)")),

    # new logic: longcat_flash, deepseek_v4, inkling, muse_spark
    # softmax over E real + Z zero experts, bias for selection, never renormalised
    Family(("longcat_flash",), "softmax_plus_bias", adapter=LongcatFlash,
           count_field="n_routed_experts"),
    # hash layers: tid2eid selection, per-expert sqrtsoftplus gates renormalised over the selection
    Family(("deepseek_v4",), "sigmoid_bias", adapter=DeepseekV4),
    Family(("inkling_text", "inkling_mm_model"), "sigmoid_with_shared", adapter=InklingText,
           count_field="n_routed_experts"),
    # experts in a projected space; sigmoid, bias for selection, renormalised
    Family(("muse_spark",), "sigmoid_bias", adapter=MuseSpark),
)
BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
