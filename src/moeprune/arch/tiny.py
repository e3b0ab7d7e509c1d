"""Tiny random models of every supported family, built from their config classes.

Used by the tests and the overhead benchmark: each model builds in well under a second and
runs a 4x128-token forward in about 10 ms on a CPU. Configs: docs/test_models.md.
"""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

_DEEPSEEK_MLA = dict(
    kv_lora_rank=32, num_key_value_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
)


def tiny_config(family: str, num_experts: int = 8, top_k: int = 2, **overrides) -> tf.PretrainedConfig:
    """The config of a tiny `family` model with `num_experts` routed experts and top-`top_k`."""
    E, k = num_experts, top_k
    specs = {
        "mixtral": (
            tf.MixtralConfig,
            dict(intermediate_size=128, num_local_experts=E, num_experts_per_tok=k),
        ),
        "qwen2_moe": (
            tf.Qwen2MoeConfig,
            dict(
                intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                num_experts=E, num_experts_per_tok=k, norm_topk_prob=False, mlp_only_layers=[0],
            ),
        ),
        "qwen3_moe": (
            tf.Qwen3MoeConfig,
            dict(
                intermediate_size=128, moe_intermediate_size=64, head_dim=16, num_experts=E,
                num_experts_per_tok=k, norm_topk_prob=True,
            ),
        ),
        "olmoe": (tf.OlmoeConfig, dict(intermediate_size=128, num_experts=E, num_experts_per_tok=k)),
        "deepseek_v2": (
            tf.DeepseekV2Config,
            dict(
                intermediate_size=128, moe_intermediate_size=64, n_routed_experts=E, num_experts_per_tok=k,
                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, topk_method="greedy",
                **_DEEPSEEK_MLA,
            ),
        ),
        "deepseek_v3": (
            tf.DeepseekV3Config,
            dict(
                intermediate_size=128, moe_intermediate_size=64, n_routed_experts=E, num_experts_per_tok=k,
                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, n_group=2, topk_group=1,
                routed_scaling_factor=2.5, **_DEEPSEEK_MLA,
            ),
        ),
        "glm4_moe": (
            tf.Glm4MoeConfig,
            dict(
                intermediate_size=128, moe_intermediate_size=64, n_routed_experts=E, num_experts_per_tok=k,
                n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16,
            ),
        ),
        "phimoe": (tf.PhimoeConfig, dict(intermediate_size=128, num_local_experts=E, num_experts_per_tok=k)),
        "gpt_oss": (
            tf.GptOssConfig,
            dict(
                intermediate_size=128, num_local_experts=E, num_experts_per_tok=k, head_dim=16,
                sliding_window=64,
            ),
        ),
        "ernie4_5_moe": (
            tf.Ernie4_5_MoeConfig,
            dict(
                intermediate_size=128, moe_intermediate_size=64, moe_num_experts=E, moe_k=k,
                moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, head_dim=16,
            ),
        ),
        "llama4_text": (
            tf.Llama4TextConfig,
            dict(
                intermediate_size=128, intermediate_size_mlp=128, num_local_experts=E, num_experts_per_tok=k,
                head_dim=16, interleave_moe_layer_step=1, attention_chunk_size=64,
            ),
        ),
    }
    if family in specs:
        cls, extra = specs[family]
        return cls(**{**COMMON, **extra, **overrides})
    return shrunk_config(family, num_experts=E, top_k=k, **overrides)


# ---- every other family: its config class's defaults, shrunk ---------------------------------------
# A field is set only where the default config has it (so one table serves every family); sub-configs
# (text, vision, audio) are shrunk recursively. `TINY_OVERRIDES` holds what a family needs beyond this.
SHRUNK_TEXT = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=512, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=2, topk_group=1,
)
SHRUNK_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2, num_heads=2,
    out_hidden_size=64, embed_dim=32,
)
SUB_CONFIGS = {"text_config": SHRUNK_TEXT, "thinker_config": SHRUNK_TEXT, "talker_config": SHRUNK_TEXT,
               "vision_config": SHRUNK_VISION, "audio_config": SHRUNK_VISION}

# [gemma] shared tiny configs
# DeepSeek-OCR 2 and Unlimited-OCR nest their vision tower's configs one level further down
SUB_CONFIGS.update(sam_config=SHRUNK_VISION, encoder_config=SHRUNK_VISION)
# the SAM neck's channels; the last is the vision encoder's width (32 once shrunk)
_SAM = dict(output_channels=16, downsample_channels=[16, 32])
_GEMMA4_TEXT = dict(
    enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64, global_head_dim=32,
    hidden_size_per_layer_input=16, vocab_size_per_layer_input=1024,
)
_INKLING2_TEXT = dict(n_layers_per_attn_res_block=1, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                      swa_head_dim=16)
_DOTS3_TEXT = dict(num_key_value_heads=4, head_dim=24, index_head_dim=16, index_n_heads=2, index_topk=8,
                   shared_experts_intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32,
                   swa_kv_lora_rank=32, swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=16)
# [/gemma]

# model_type -> fields set after the shrinking (a nested dict for a sub-config)
TINY_OVERRIDES: dict[str, dict] = {
    # text decoders with standard fused experts (A)
    # text decoders with standard fused experts (B)
    "deepseek_v32": dict(num_key_value_heads=4),  # MLA: one key/value head per query head
    "glm4_moe_lite": dict(num_key_value_heads=4),
    "glm_moe_dsa": dict(num_key_value_heads=4),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1),
    # hybrids: linear attention / Mamba layers (C)
    # vision-language and omni checkpoints (D)

    # [text] plain text decoders and their wrappers
    # [/text]

    # [vlm] vision-language / omni checkpoints
    # [/vlm]

    # [gemma] gemma4 and OCR/speech wrappers
    # Gemma 4's defaults are dense (enable_moe_block=False, no expert count); the MoE checkpoints
    # (26B-A4B) enable it in every layer. Full-attention layers default to head_dim 512; the per-layer
    # embeddings (PLE) table defaults to 262144 rows.
    "gemma4_text": _GEMMA4_TEXT,
    # Gemma4Config has no vision tower by default: a tiny one, so the checkpoint is a real image-text one
    "gemma4": dict(text_config=_GEMMA4_TEXT, vision_config=dict(
        model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, position_embedding_size=64)),
    # an attention-residual block boundary at every layer, so later layers read earlier layers' inputs
    # (sliding-window layers have their own head counts, 48 x 128 by default)
    "inkling2_text": _INKLING2_TEXT,
    "inkling2": dict(text_config=_INKLING2_TEXT, vision_config=dict(text_hidden_size=64)),
    # MLA with one key/value head per query head (the validator insists), sliding-window head_dim =
    # qk_nope + qk_rope, a small DSA indexer; the vision tower has its own (untouched) experts
    "dots3_note_text": _DOTS3_TEXT,
    "dots3_note": dict(
        text_config=_DOTS3_TEXT,
        # one vision layer, sparse, with 4 experts (the default pyramid names layers 25..41)
        vision_config=dict(adapter_in_dim=32, adapter_out_dim=64, moe_intermediate_size=32,
                           num_local_experts=4, num_experts_per_tok=2, pyramid_num_routed=[4]),
        audio_config=dict(adapter_input_size=32, adapter_out_dim=64, downsample_hidden_size=16),
    ),
    # DeepSeek-OCR 2: a DeepSeek-V2 MoE decoder (its layer kinds are not derived: listed here) behind a
    # SAM + Qwen2-style vision encoder
    "deepseek_ocr2": dict(
        text_config=dict(mlp_layer_types=["dense", "sparse", "sparse"], num_experts_per_tok=2,
                         n_shared_experts=1),
        vision_config=dict(encoder_config=dict(vocab_size=64), sam_config=_SAM),
    ),
    "unlimited_ocr": dict(vision_config=dict(encoder_config=dict(vocab_size=64), sam_config=_SAM)),
    # [/gemma]

    # [hybrid] hybrids: Mamba / linear attention
    # [/hybrid]

    # [logic1] new logic: dbrx, jetmoe, doge, zaya
    # [/logic1]

    # [logic2] new logic: longcat_flash, deepseek_v4, inkling, muse_spark
    # [/logic2]
}


def _shrunk_kwargs(cls, sizes: dict, num_experts: int, top_k: int, overrides: dict) -> dict:
    from moeprune.arch.base import COUNT_FIELDS, TOP_K_FIELDS

    default = cls()
    fields = default.to_dict()
    kw = {k: v for k, v in sizes.items() if fields.get(k) is not None or (k == "q_lora_rank" and k in fields)}
    if sizes is SHRUNK_TEXT:
        kw.update({f: num_experts for f in COUNT_FIELDS if isinstance(fields.get(f), int)})
        kw.update({f: top_k for f in TOP_K_FIELDS if isinstance(fields.get(f), int)})
        n = kw.get("num_hidden_layers", 3)
        if isinstance(fields.get("layer_types"), list):
            kw["layer_types"] = fields["layer_types"][:n]
        if isinstance(fields.get("mlp_layer_types"), list) and len(fields["mlp_layer_types"]) > n:
            # the first layer's kind, then the last layers' (dense layers come first, MoE ones last)
            kw["mlp_layer_types"] = fields["mlp_layer_types"][:1] + fields["mlp_layer_types"][-(n - 1):]
    for sub, sub_sizes in SUB_CONFIGS.items():
        if isinstance(fields.get(sub), dict):
            sub_cls = type(getattr(default, sub))
            sub_over = overrides.get(sub, {})
            kw[sub] = sub_cls(**_shrunk_kwargs(sub_cls, sub_sizes, num_experts, top_k, sub_over)).to_dict()
        elif sub in overrides:  # a tower the defaults leave out (None), given whole by the overrides
            kw[sub] = overrides[sub]
    kw.update({k: v for k, v in overrides.items() if k not in SUB_CONFIGS})
    return kw


def shrunk_config(model_type: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """The config class of `model_type` at its defaults, shrunk to a tiny model (`SHRUNK_TEXT`), then
    `TINY_OVERRIDES[model_type]` and `overrides`."""
    from moeprune.compat import config_class

    cls = config_class(model_type)
    if cls is None:
        raise KeyError(f"transformers has no config class for model_type {model_type!r}")
    wanted = {**TINY_OVERRIDES.get(model_type, {}), **overrides}
    config = cls(**_shrunk_kwargs(cls, SHRUNK_TEXT, num_experts, top_k, wanted))
    if not getattr(config, "architectures", None):
        config.architectures = [_preferred_class(config).__name__]
    return config


def _preferred_class(config):
    """A multimodal config's full class (vision tower included), else its causal LM."""
    from moeprune import compat

    pairs = compat.auto_classes(config)
    for auto_name, cls in pairs:
        if auto_name != "AutoModelForCausalLM" and hasattr(config, "vision_config"):
            return cls
    return pairs[0][1]


TINY_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "phimoe", "gpt_oss", "ernie4_5_moe", "llama4_text",
)


def tiny_model(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny random causal LM of `family` in eval mode, with non-trivial router biases.

    Correction biases are zero at init; they are randomised here so that slicing them is checked.
    """
    from moeprune.compat import model_class

    config = tiny_config(family, **kwargs)
    torch.manual_seed(seed)
    model = model_class(config)[1]._from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.rand_like(tensor) * 0.1)
            elif name.endswith("router.bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


# The tokenizer's training text. It is this module's first docstring, frozen: the tiny checkpoints (and
# every test figure computed on them) depend on it, so editing the docstring must not change them.
TOKENIZER_TEXT = """Tiny random models of every supported family, built from their config classes.

Used by the tests and the overhead benchmark: each model builds in well under a second and
runs a 4x128-token forward in about 10 ms on a CPU. Configs from shared/TINY_CONFIGS.md.
"""


def tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer (ids < 1024) trained on a fixed text, for tiny checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [TOKENIZER_TEXT + " the quick brown fox jumps over the lazy dog " * 4 + str(i) for i in range(50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def save_tiny_checkpoint(family: str, path, seed: int = 0, **kwargs):
    """Write a tiny random `family` model with a tokenizer to `path` (a stock HF directory)."""
    model = tiny_model(family, seed=seed, **kwargs)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return model
