"""Vision-language and omni checkpoints (GLM-4.5V, GLM-5-Next, Kimi-K2.5, Qwen3-VL, Qwen3-Omni): the language
model's layers are found (never the vision blocks), and Qwen3-Omni's thinker is pruned and its talker written
untouched. ERNIE-4.5-VL has its own file (test_ernie_families.py)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from helpers import manual_plan, saved_tensors, token_ids

from moeprune import api, compat
from moeprune.arch import get_adapter
from moeprune.arch.base import decoder_layers, text_generator
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.errors import MoepruneError

KEEP = [0, 1, 4, 5]


@pytest.mark.parametrize("model_type,prefix", [
    ("glm4v_moe", "model.language_model.layers."),
    ("kimi_k25", "model.language_model.layers."),
    ("qwen3_omni_moe", "thinker.model.language_model.layers."),  # not the talker's, nor the towers'
    ("qwen3_omni_moe_thinker", "model.language_model.layers."),
])
def test_the_decoder_layers_are_the_language_models(model_type, prefix):
    model = tiny_model(model_type)
    layers, found = decoder_layers(model)
    assert found == prefix
    assert model.get_submodule(prefix.rstrip(".")) is layers


@pytest.mark.parametrize("model_type,holder", [
    ("glm4v_moe_text", "Glm4vMoeForConditionalGeneration"),
    ("glm5_next_text", "Glm5NextForConditionalGeneration"),
    ("qwen3_vl_moe_text", "Qwen3VLMoeForConditionalGeneration"),
    ("qwen3_omni_moe_text", "Qwen3OmniMoeForConditionalGeneration"),
])
def test_a_text_type_with_no_lm_class_is_built_as_the_model_that_ships_it(model_type, holder):
    config = tf.AutoConfig.for_model(model_type)
    assert not compat.auto_classes(config)  # transformers has no causal LM for the text type alone
    model = tiny_model(model_type)
    assert type(model).__name__ == holder
    assert get_adapter(model.config).config.model_type == model_type


def test_qwen3_omni_text_logits_come_from_the_thinker():
    model = tiny_model("qwen3_omni_moe")
    assert text_generator(model) is model.thinker
    with pytest.raises(TypeError):  # the wrapper itself only generates (nn.Module's unimplemented forward)
        model(input_ids=token_ids())
    logits = text_generator(model)(input_ids=token_ids(), use_cache=False).logits
    assert logits.shape[-1] == model.config.thinker_config.text_config.vocab_size


@pytest.mark.slow
def test_qwen3_omni_prunes_the_thinker_and_writes_the_talker_untouched(tmp_path):
    src = tmp_path / "omni"
    original = save_tiny_checkpoint("qwen3_omni_moe", src)
    out = api.apply_checkpoint(src, manual_plan(original, keep=KEEP), tmp_path / "out", layerwise=True,
                               progress=False)
    config = tf.AutoConfig.from_pretrained(out)
    assert config.thinker_config.text_config.num_experts == len(KEEP)
    assert config.talker_config.text_config.num_local_experts == 8  # the talker's MoE keeps every expert
    auto_name, cls = compat.model_class(config)
    reloaded = getattr(tf, auto_name).from_pretrained(out)
    assert type(reloaded) is type(original)
    for layer in reloaded.thinker.model.language_model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == len(KEEP)
    before, after = saved_tensors(src), saved_tensors(out)
    untouched = ("talker.", "code2wav.", "thinker.visual.", "thinker.audio_tower.")
    talker = [k for k in before if k.startswith(untouched)]
    assert any(".experts." in k for k in talker)
    for key in talker:
        assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("config_class", [
    tf.Glm4vMoeTextConfig, tf.Qwen3VLMoeTextConfig, tf.Glm5NextTextConfig])
def test_a_bare_text_config_with_no_lm_class_is_refused_in_one_line(config_class):
    with pytest.raises(MoepruneError, match="no causal-LM or image-text-to-text class") as e:
        get_adapter(config_class())
    assert "\n" not in str(e.value) and "ship as" in str(e.value)
