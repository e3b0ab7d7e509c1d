"""Tiny random models of every supported family, built from their config classes.

Used by the tests and the overhead benchmark: each model builds in well under a second and
runs a 4x128-token forward in about 10 ms on a CPU. Configs: docs/test_models.md.
"""

from __future__ import annotations

from contextlib import contextmanager

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

# sizes the shrinking does not reach
_MINIMAX_M3 = dict(dense_intermediate_size=128, shared_intermediate_size=64)
# linear-attention and attention layers, a per-layer n-gram embedding (PLE, needs an eos id) on the last
# (one-based ids), a small hashed n-gram vocabulary
_QWEN4_EXP = dict(
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    hc_lowrank=16, layer_types=["linear_attention", "full_attention", "linear_attention"], ple_layer_ids=[3],
    ngram_vocab_size_base=1000, split_ngram_parts=1, eos_token_id=2,
    # every attention layer has a QSA token indexer (budget 32 tokens, in blocks of 4)
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=32, indexer_compress_ratio=4,
)
# a Whisper-style audio encoder (Qwen3-Omni's), shrunk
_TINY_AUDIO = dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, output_dim=64,
                   downsample_hidden_size=16, num_mel_bins=16)
# shared tiny configs
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
# Nemotron-H's mixers shrunk to a few heads; Mamba, MoE, attention and MoE layers
_NEMOTRON_H = dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
                   mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
                   moe_shared_expert_intermediate_size=64)

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

    # plain text decoders and their wrappers
    # MLA: one key/value head per query head; head_dim is the rotary slice (qk_rope_head_dim), which a
    # shrunk head_dim kwarg would overwrite after the config's own __post_init__ set it
    "axk1": dict(num_key_value_heads=4, head_dim=8),
    "axk2": dict(num_key_value_heads=4, head_dim=8),
    "mistral_large4": dict(text_config=dict(num_key_value_heads=4, head_dim=8)),
    "flex_olmo": dict(pad_token_id=0),  # the default pad id lies past the tiny vocabulary
    "hy_v4": dict(pad_token_id=0),
    "hunyuan_v1_moe": dict(head_dim=16),  # its default None reaches `head_dim ** -0.5`
    # short-conv and attention layers, both with MoE blocks (layer 0 is the dense one)
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    # the rotary share is qk_rope / (qk_nope + qk_rope); YaRN needs it to give an even rotary width
    "mistral4": dict(qk_nope_head_dim=8, qk_rope_head_dim=8),
    "mistral3": dict(text_config=dict(model_type="mistral4", qk_nope_head_dim=8, qk_rope_head_dim=8)),
    # the text model always builds a sliding-window mask
    "step3p7": dict(text_config=dict(
        sliding_window=64, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        share_expert_dim=64)),
    "minimax_m3_vl_text": _MINIMAX_M3,
    "minimax_m3_vl": dict(text_config=_MINIMAX_M3, projector_hidden_size=64),
    "qwen4_exp_text": _QWEN4_EXP,
    "qwen4_exp": dict(text_config=_QWEN4_EXP),

    # vision-language / omni checkpoints
    # GLM-5-Next: MLA without RoPE (qk_rope_head_dim 0) and one KV head per query head, both validated;
    # one indexed-attention layer among the linear (KDA) ones; the default pad id lies past the vocabulary
    "glm5_next": dict(text_config=dict(
        pad_token_id=0, num_key_value_heads=4, qk_rope_head_dim=0, index_topk=32, index_head_dim=16,
        index_n_heads=4, linear_head_dim=16, linear_num_heads=4,
        layer_types=["linear_attention", "indexed_attention", "linear_attention"])),
    # MLA: one key/value head per query head; head_dim is the rotary slice (qk_rope_head_dim)
    "kimi_k25": dict(text_config=dict(num_key_value_heads=4, head_dim=8)),
    # multimodal RoPE: the (t, h, w) sections split the rotary half-width (16 * 0.5 / 2 = 4)
    "glm4v_moe": dict(text_config=dict(rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1]))),
    # Qwen3-Omni: the thinker holds the text, vision and audio configs; the talker its own MoE text model
    # and a code predictor (its modeling reads `shared_expert_intermediate_size` and `spatial_merge_size`,
    # fields its config classes lack; shipped configs carry them); code2wav is the vocoder
    "qwen3_omni_moe": dict(
        thinker_config=dict(audio_config=_TINY_AUDIO),
        talker_config=dict(text_config=dict(shared_expert_intermediate_size=64), thinker_hidden_size=64,
                           spatial_merge_size=2, accept_hidden_layer=1, code_predictor_config=dict(
                               vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_code_groups=4,
                               layer_types=["full_attention"])),
        code2wav_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, codebook_size=64, num_quantizers=4, decoder_dim=32,
                             upsample_rates=[2, 2], upsampling_ratios=[2]),
    ),
    "qwen3_omni_moe_thinker": dict(audio_config=_TINY_AUDIO),
    # ERNIE-4.5-VL: text and vision expert widths, one list; the
    # (h, w, t) RoPE sections split the 8 rotary frequencies of a 16-wide head
    "ernie4_5_vl_moe": dict(text_config=dict(moe_intermediate_size=[64, 32], rope_parameters=dict(
        rope_type="default", rope_theta=500000.0, mrope_section=[3, 3, 2]))),

    # gemma4 and OCR/speech wrappers
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

    # hybrids: Mamba / linear attention
    # Mamba/linear and attention layers side by side, and MoE in both kinds; the mixers shrunk to a few heads
    "jamba": dict(num_hidden_layers=4, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8),  # M A M M; MoE on 1 (A), 3 (M)
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"],
                             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
                             shared_intermediate_size=64),
    "nemotron_h": _NEMOTRON_H,
    # Nemotron-H text decoders inside multimodal wrappers (the text config gets nemotron_h's sizes)
    # Nemotron-3-Nano-Omni: a RADIO vision tower (its video patch packing validated equal to the wrapper's;
    # position table sized from max_img_size) and a Parakeet audio encoder, each with a projector onto the
    # text width; shipped audio configs carry the projector's fields, which ParakeetEncoderConfig lacks
    "nemotron_h_omni": dict(
        text_config=_NEMOTRON_H, vision_hidden_size=32, projector_hidden_size=64,
        vision_config=dict(video_temporal_patch_size=2, image_size=64, max_img_size=128),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, subsampling_conv_channels=16, num_mel_bins=16,
                          projection_hidden_size=64, projection_bias=False),
    ),
    # Nemotron-3.5-Transcribe: a speech recognition encoder, a diarization model (its own encoder and a
    # speaker head reading it) and a word-timestamp encoder reading the speech states (so as wide)
    "nemo_speechlm": dict(
        text_config=_NEMOTRON_H,
        audio_config=dict(
            asr_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_mel_bins=16),
            diarization_config=dict(
                audio_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_mel_bins=16),
                head_config=dict(hidden_size=16, audio_hidden_size=32),
                chunk_length=64, chunk_left_context=8, chunk_right_context=8, fifo_length=8,
                speaker_cache_update_period=16, streaming_config=dict(speaker_cache_length=16)),
        ),
        word_timestamp_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=64, blank_token_id=63),
    ),
    # their configs' token ids lie in a 160k vocabulary: the embeddings' padding row must exist
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention", "linear_attention"],
                        num_key_value_heads=4, linear_num_heads=4, linear_head_dim=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"],
                           num_key_value_heads=4, n_group=2, topk_group=1,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2),

    # new logic: dbrx, jetmoe, doge, zaya
    # DBRX nests attention and experts in sub-configs; its attention reads `attn_config.rope_theta`, which
    # DbrxAttentionConfig does not declare but real DBRX checkpoints carry (as they carry clip_qkv = 8,
    # without which its attention fails)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=3, max_seq_len=512,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=8, moe_top_k=2)),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=32),  # ZAYA routes top-1 only

    # new logic: longcat_flash, deepseek_v4, inkling, muse_spark
    # 3 decoder layers of two attention sublayers each; MLA with one rope head dim = head_dim. No zero
    # experts here: the battery checks every experts tensor is E long, and LongCat's gate_up_proj is E + Z
    # (tests/arch/test_logic2_families.py builds it with zero_expert_num=2).
    "longcat_flash": dict(
        num_layers=3, ffn_hidden_size=128, expert_ffn_hidden_size=64, n_routed_experts=8, moe_topk=2,
        zero_expert_num=0, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=16, vocab_size=1024,
        max_position_embeddings=512,
    ),
    # hash-routed blocks need the token ids, which the battery's block-alone calls do not pass: learned
    # routing here; the hash layers are tested in tests/arch/test_logic2_families.py
    "deepseek_v4": dict(mlp_layer_types=["moe", "moe", "moe"]),
    # the towers project onto the text width (64); Inkling's vision patch MLP is sized from its patch
    # (2 x 4 x 4 here, not 2 x 40 x 40); Muse Spark's audio pyramid needs one entry per stage
    "inkling_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                         n_shared_experts=2),
    "inkling_mm_model": dict(
        text_config=dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                         n_shared_experts=2),
        vision_config=dict(text_hidden_size=64, patch_size=4, temporal_patch_size=2, num_hidden_layers=2),
        audio_config=dict(text_hidden_size=64, n_mel_bins=16),
    ),
    # the experts' projected width equals the text width here, since the battery reads an expert's down
    # projection as [hidden, I]; tests/arch/test_logic2_families.py builds moe_hidden_size=32
    "muse_spark": dict(
        text_config=dict(moe_hidden_size=64, eos_token_id=1, bos_token_id=0),
        out_hidden_size=128, projector_hidden_size=64,
        audio_config=dict(num_hidden_layers=1, patch_sizes=[4], hidden_sizes=[32], depths=[1],
                          out_hidden_size=64),
    ),
}


def _shrunk_kwargs(cls, sizes: dict, num_experts: int, top_k: int, overrides: dict) -> dict:
    from moeprune.arch.base import COUNT_FIELDS, TOP_K_FIELDS
    from moeprune.compat import config_class

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
            sub_over = dict(overrides.get(sub, {}))
            # a sub-config of another model type than the default's (Mistral 3 holding a Mistral 4)
            sub_cls = config_class(sub_over.pop("model_type")) if "model_type" in sub_over else type(
                getattr(default, sub))
            kw[sub] = sub_cls(**_shrunk_kwargs(sub_cls, sub_sizes, num_experts, top_k, sub_over)).to_dict()
        elif sub in overrides:  # a tower the defaults leave out (None), given whole by the overrides
            kw[sub] = overrides[sub]
    kw.update({k: v for k, v in overrides.items() if k not in SUB_CONFIGS})
    return kw


def shrunk_config(model_type: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """The config class of `model_type` at its defaults, shrunk to a tiny model (`SHRUNK_TEXT`), then
    `TINY_OVERRIDES[model_type]` and `overrides`."""
    from moeprune import compat

    cls = compat.config_class(model_type)
    if cls is None:
        raise KeyError(f"transformers has no config class for model_type {model_type!r}")
    owner = compat.defining_model_type(model_type)
    if owner is not None and not compat.auto_classes(cls()):
        # a text model_type with no generator class of its own (Glm4vMoeTextModel has no LM head) ships
        # only inside the vision-language model that defines it, so that is its tiny model
        return shrunk_config(owner, num_experts, top_k, **overrides)
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


@contextmanager
def _uninitialized_as_nan():
    """Fill every newly allocated tensor with NaN (torch's deterministic mode), so uninitialized ones show."""
    import torch.utils.deterministic as deterministic

    before = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        deterministic.fill_uninitialized_memory = before[1]


def tiny_model(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny random causal LM of `family` in eval mode, with non-trivial router biases.

    Correction biases are zero at init; they are randomised here so that slicing them is checked.
    """
    from moeprune.compat import model_class

    config = tiny_config(family, **kwargs)
    torch.manual_seed(seed)
    with _uninitialized_as_nan():
        model = model_class(config)[1]._from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for tensor in model.parameters():
            # a tensor transformers' init never reaches (Qwen3-Omni's talker experts) would hold whatever
            # memory it got, so two builds would differ; it gets seeded random values instead
            if tensor.is_floating_point() and tensor.isnan().all():
                tensor.normal_(0.0, 0.02)
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
