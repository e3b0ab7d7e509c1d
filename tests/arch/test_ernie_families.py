"""ERNIE-4.5-VL: each decoder MoE layer holds a text MoE and a vision MoE under one expert count. The text MoE
is planned; the vision MoE of the same layer keeps the same number of experts, those with the lowest
correction bias (a weight-only rule), pruned even when the text plan merges; the vision tower is untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import calibration_text, manual_plan, saved_tensors, token_ids

from moeprune import api, compat
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model, tiny_tokenizer
from moeprune.surgery import apply_layer_plan, apply_plan

KEEP = [0, 1, 4, 5]


def _model_with_distinct_biases(seed: int = 0):
    """The tiny ERNIE-4.5-VL with a different permutation of distinct vision correction biases per layer."""
    model = tiny_model("ernie4_5_vl_moe")
    gen = torch.Generator().manual_seed(seed)
    for holder in _holders(model):
        bias = holder.vision_moe.gate.moe_statics.e_score_correction_bias  # [1, E]
        with torch.no_grad():
            bias.copy_(torch.randperm(bias.shape[1], generator=gen).float()[None] * 0.01)
    return model


def _holders(model):
    return [layer.mlp for layer in model.model.language_model.layers if hasattr(layer.mlp, "vision_moe")]


def _lowest_bias(holder, n: int) -> list[int]:
    bias = holder.vision_moe.gate.moe_statics.e_score_correction_bias.reshape(-1)  # [E]
    return sorted(bias.argsort()[:n].tolist())


def _vision_tensors(holder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in holder.vision_moe.state_dict().items()}


def test_the_planned_block_is_the_text_moe():
    model = _model_with_distinct_biases()
    blocks = get_adapter(model.config).moe_blocks(model)
    assert [blocks[i] for i in sorted(blocks)] == [h.text_moe for h in _holders(model)]


@pytest.mark.parametrize("plan_kind", ["prune", "merge"])
def test_the_vision_moe_keeps_exactly_the_lowest_bias_experts(plan_kind):
    model = _model_with_distinct_biases()
    holders = _holders(model)
    before = [_vision_tensors(h) for h in holders]
    expected = [_lowest_bias(h, len(KEEP)) for h in holders]
    assert any(e != KEEP for e in expected)  # the rule, not the text plan's keep set, decides
    if plan_kind == "prune":
        plan = manual_plan(model, keep=KEEP)
    else:  # merging text experts still prunes the vision experts
        plan = manual_plan(model, groups=[([0, 2], [0.5, 0.5]), ([1, 3], [0.5, 0.5]), ([4, 6], [0.5, 0.5]),
                                          ([5, 7], [0.5, 0.5])])
    apply_plan(model, plan)
    assert model.config.text_config.moe_num_experts == len(KEEP)
    for holder, old, keep, lp in zip(holders, before, expected, plan.layers):
        keep_t = torch.tensor(keep)
        gate = holder.vision_moe.gate
        assert torch.equal(gate.weight, old["gate.weight"][keep_t])
        assert torch.equal(gate.moe_statics.e_score_correction_bias,
                           old["gate.moe_statics.e_score_correction_bias"][:, keep_t])
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(holder.vision_moe.experts, name), old[f"experts.{name}"][keep_t])
        assert holder.num_experts == holder.vision_moe.num_experts == gate.num_experts == len(KEEP)
        assert holder.vision_moe.experts.num_experts == len(KEEP)
        assert lp.notes["vision_experts_kept"] == keep


def test_equal_biases_keep_the_lowest_indices():
    from moeprune.arch.families import Ernie45VL

    model = _model_with_distinct_biases()
    vision = _holders(model)[0].vision_moe
    with torch.no_grad():
        vision.gate.moe_statics.e_score_correction_bias.copy_(
            torch.tensor([[0.3, 0.1, 0.1, 0.2, 0.1, 0.2, 0.0, 0.3]]))
    assert Ernie45VL.vision_keep(vision, 4).tolist() == [1, 2, 4, 6]


def test_a_copy_of_the_text_moe_alone_never_reaches_the_models_vision_moe():
    """Candidate evaluations apply plans to a copy of the block: the model's vision experts stay."""
    model = _model_with_distinct_biases()
    adapter = get_adapter(model.config)
    holder = _holders(model)[0]
    before = _vision_tensors(holder)
    lp = manual_plan(model, keep=KEEP).layers[0]
    apply_layer_plan(adapter, copy.deepcopy(holder.text_moe), lp)
    for name, tensor in holder.vision_moe.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert "vision_experts_kept" not in lp.notes


def test_text_logits_without_images_follow_the_text_plan_and_the_vision_tower_is_untouched():
    model = _model_with_distinct_biases().eval()
    original = copy.deepcopy(model)
    apply_plan(model, manual_plan(model, keep=list(range(8))))  # identity: every expert kept
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    apply_plan(model, manual_plan(model, keep=KEEP))
    before, after = original.state_dict(), model.state_dict()
    outside = [k for k in before if not k.startswith("model.language_model.")]
    assert any(k.startswith("model.vision_tower.") for k in outside)
    for key in outside:
        assert torch.equal(after[key], before[key]), key


@pytest.mark.slow
def test_a_reap_pruned_checkpoint_reloads_with_its_own_auto_class(tmp_path):
    model = _model_with_distinct_biases()
    src = tmp_path / "ernie"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    out = tmp_path / "out"
    api.prune(src, "reap", out, experts=len(KEEP), calib=str(calib), progress=False, samples=8, seq_len=32)
    notes = [lp["notes"] for lp in json.loads((out / "moeprune_plan.json").read_text())["layers"]]
    assert [n["vision_experts_kept"] for n in notes] == [_lowest_bias(h, len(KEEP)) for h in _holders(model)]

    config = tf.AutoConfig.from_pretrained(out)
    assert config.text_config.moe_num_experts == len(KEEP)
    auto_name, cls = compat.model_class(config)
    reloaded, info = getattr(tf, auto_name).from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = reloaded.eval()(input_ids=token_ids()).logits
    assert logits.shape[-1] == config.text_config.vocab_size and torch.isfinite(logits).all()

    for old, new in zip(_holders(model), _holders(reloaded)):
        keep = torch.tensor(_lowest_bias(old, len(KEEP)))
        assert torch.equal(new.vision_moe.experts.down_proj, old.vision_moe.experts.down_proj[keep])
        assert torch.equal(new.vision_moe.gate.weight, old.vision_moe.gate.weight[keep])
    before, after = saved_tensors(src), saved_tensors(out)
    # on disk the towers are `model.vision_model.` and `model.resampler_model.`
    tower = [k for k in before if not k.startswith("model.layers.")]
    assert any(k.startswith("model.vision_model.") for k in tower)
    for key in tower:
        assert torch.equal(after[key], before[key]), key
