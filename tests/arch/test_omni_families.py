"""Nemotron-H text decoders inside multimodal wrappers: Nemotron-3-Nano-Omni (`nemotron_h_omni`: RADIO vision
and Parakeet audio towers) and Nemotron-3.5-Transcribe (`nemo_speechlm`: speech recognition, diarization and
word-timestamp encoders). The battery in test_every_family.py covers each tiny model; here: the towers are
real and small, a pruned checkpoint's towers compute what they did, and a NeMo export (routed experts fused
and stored [E, in, out]) is read through transformers' conversion and written back in its own layout.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf
from helpers import manual_plan, saved_tensors
from safetensors.torch import load_file, save_file

from moeprune import api, compat
from moeprune.arch import get_adapter
from moeprune.arch.base import decoder_layers
from moeprune.arch.families import NemotronH
from moeprune.arch.tiny import TINY_OVERRIDES, save_tiny_checkpoint, tiny_model

KEEP = [0, 1, 4, 5]  # two per routing group (n_group = 2)
TOWERS = {  # model_type -> (its decoder layers, the modules around the decoder)
    "nemotron_h_omni": ("language_model.model.layers.",
                        {"vision_model", "audio_tower", "multi_modal_projector", "embed_audio"}),
    "nemo_speechlm": ("model.language_model.layers.",
                      {"audio_tower", "word_timestamp_encoder", "multi_modal_projector"}),
}


def _reload(path):
    auto_name, _ = compat.model_class(tf.AutoConfig.from_pretrained(path))
    model, info = getattr(tf, auto_name).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_the_wrappers_hold_a_tiny_nemotron_h_decoder_beside_real_towers(model_type):
    model = tiny_model(model_type)
    prefix, towers = TOWERS[model_type]
    assert isinstance(get_adapter(model.config), NemotronH)
    assert decoder_layers(model)[1] == prefix
    held = {name.split(".")[-1] for name, _ in model.named_modules() if name and name.count(".") <= 1}
    assert towers <= held, towers - held
    for tower in towers:  # every tower has weights (none left out by a None sub-config)
        module = next(m for name, m in model.named_modules() if name.split(".")[-1] == tower)
        assert sum(p.numel() for p in module.parameters()) > 0, tower
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # a few MB: every tower shrunk


def _tower_outputs(model, model_type):
    """What each tower hands the decoder, for fixed image and audio inputs."""
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(1, 64, 16, generator=g)  # [clips, frames, mel bins]
    with torch.no_grad():
        if model_type == "nemo_speechlm":
            return [model.get_audio_features(mel, torch.ones(1, 64, dtype=torch.long)).pooler_output]
        patches = torch.randn(16, 3 * 16 * 16, generator=g)  # one 4 x 4 patch grid of 16 x 16 RGB patches
        image = model.get_image_features(patches, torch.tensor([[4, 4]])).pooler_output[0]
        return [image, model.get_audio_features(mel).pooler_output]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,overrides", [
    # with an MTP layer announced, the omni model puts a layernorm after its vision tower
    ("nemotron_h_omni", dict(text_config={**TINY_OVERRIDES["nemotron_h"], "num_nextn_predict_layers": 1})),
    ("nemo_speechlm", {}),
])
def test_a_pruned_checkpoints_towers_compute_what_they_did(model_type, overrides, calib_file, tmp_path):
    original = save_tiny_checkpoint(model_type, tmp_path / "src", **overrides)
    out = api.prune(tmp_path / "src", "frequency", tmp_path / "out", experts=4, calib=str(calib_file),
                    samples=8, seq_len=32, progress=False)
    pruned = _reload(out)
    assert type(pruned) is type(original)
    assert pruned.config.get_text_config().n_routed_experts == 4
    assert pruned.config.get_text_config().num_nextn_predict_layers == (1 if overrides else 0)
    if overrides:
        assert pruned.vision_final_layernorm is not None
    for before, after in zip(_tower_outputs(original, model_type), _tower_outputs(pruned, model_type)):
        assert torch.equal(before, after)
    # the decoder changed: its experts are the 4 kept of 8
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=ids, use_cache=False).logits).all()


_PER_EXPERT = re.compile(r"(.*\.mixer\.experts)\.(\d+)\.(up|down)_proj\.weight")


def _as_nemo_export(path):
    """Rewrite a tiny nemo_speechlm checkpoint's per-expert tensors the way NVIDIA's NeMo export stores
    them: `experts.gate_and_up_projs` [E, H, I] and `experts.down_projs` [E, I, H] (transposed)."""
    file = next(path.glob("*.safetensors"))
    tensors, experts = {}, {}
    for key, t in load_file(file).items():
        m = _PER_EXPERT.fullmatch(key)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
        else:
            tensors[key] = t
    for (prefix, which), per in experts.items():
        name = "gate_and_up_projs" if which == "up" else "down_projs"
        tensors[f"{prefix}.{name}"] = torch.stack([per[e] for e in sorted(per)]).transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    return tensors


@pytest.mark.slow
def test_a_nemo_export_is_pruned_in_its_own_layout(tmp_path):
    src = tmp_path / "nemo"
    original = save_tiny_checkpoint("nemo_speechlm", src)
    before = _as_nemo_export(src)
    assert torch.equal(_reload(src).state_dict()["lm_head.weight"], original.state_dict()["lm_head.weight"])
    out = api.apply_checkpoint(src, manual_plan(original, keep=KEEP), tmp_path / "out", layerwise=True,
                               progress=False)
    after = saved_tensors(out)
    fused = [k for k in before if k.endswith(("gate_and_up_projs", "down_projs"))]
    assert fused and not any(_PER_EXPERT.fullmatch(k) for k in after)
    for key in fused:  # the kept experts, in the NeMo layout [E', in, out]
        assert torch.equal(after[key], before[key][KEEP]), key
    for key in set(before) - set(fused):
        if not key.endswith("mixer.gate.weight") and not key.endswith("e_score_correction_bias"):
            assert torch.equal(after[key], before[key]), key
    pruned = _reload(out)
    layer = pruned.model.language_model.layers[1].mixer
    assert layer.experts.up_proj.shape[0] == len(KEEP) and layer.gate.weight.shape[0] == len(KEEP)


# tensors the shipped checkpoints hold that the model classes drop on load
# (`_keys_to_ignore_on_load_unexpected`, which transformers matches against the renamed key), and an MTP
# layer, which is carried (store/mtp.py)
SHIPPED_EXTRAS = {
    "nemotron_h_omni": {"sound_encoder.encoder.feature_extractor.featurizer.window": torch.ones(16)},
    "nemo_speechlm": {"perception.preprocessor.featurizer.window": torch.ones(16),
                      "llm.model.layers.2.mixer._extra_state": torch.zeros(3, dtype=torch.uint8),
                      "ctc_timestamp.decoder.residual_scale": torch.tensor(0.1)},
}
MTP = {"nemotron_h_omni": "language_model.mtp.layers.0.norm.weight",
       "nemo_speechlm": "llm.mtp.layers.0.norm.weight"}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(SHIPPED_EXTRAS))
def test_tensors_the_model_class_drops_are_dropped_and_the_mtp_layer_carried(model_type, tmp_path):
    src = tmp_path / "src"
    original = save_tiny_checkpoint(model_type, src)
    file = next(src.glob("*.safetensors"))
    extras = {**SHIPPED_EXTRAS[model_type], MTP[model_type]: torch.ones(64)}
    save_file({**load_file(file), **extras}, file, metadata={"format": "pt"})
    out = api.apply_checkpoint(src, manual_plan(original, keep=KEEP), tmp_path / "out", layerwise=True,
                               progress=False)
    written = saved_tensors(out)
    assert not set(SHIPPED_EXTRAS[model_type]) & set(written)
    assert torch.equal(written[MTP[model_type]], torch.ones(64))
    assert type(_reload(out)) is type(original)
