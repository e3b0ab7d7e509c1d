"""MTP layers (`moeprune.store.mtp`): transformers drops them on load, moeprune carries them to the output
with their routed experts reduced by the last MoE decoder layer's plan, the rest bit-identical, the same
whether the checkpoint is read layer by layer or loaded whole.

The tiny checkpoints get synthetic MTP tensors under the names the real checkpoints use: an appended
decoder layer `model.layers.{num_hidden_layers}.` with eh_proj, enorm, hnorm and shared_head
(DeepSeek-V3, GLM-4.5), or an `mtp` module with `mtp.layers.0.` and mtp.fc / mtp.pre_fc_norm_* / mtp.norm
(Qwen3-Next, Qwen3.5, EXAONE-MoE).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers as tf
from helpers import manual_plan, saved_tensors
from safetensors.torch import load_file, save_file

from moeprune import api, compat
from moeprune.arch import get_adapter
from moeprune.arch.tiny import save_tiny_checkpoint
from moeprune.errors import MoepruneError
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.store.sharded import ShardedCheckpoint

H, V, E = 64, 1024, 8
KEEP = [0, 1, 4, 5]  # two per routing group of DeepSeek-V3's tiny n_group = 2
# model type -> (decoder layers' on-disk prefix, MTP layer prefix, config field announcing it,
#                extra tensors of the MTP layer, MTP tensors outside the layer)
SPECS = {
    "deepseek_v3": ("model.layers.", "model.layers.3.", "num_nextn_predict_layers",
                    {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H),
                     "embed_tokens.weight": (V, H), "shared_head.norm.weight": (H,),
                     "shared_head.head.weight": (V, H)}, {}),
    "qwen3_next": ("model.layers.", "mtp.layers.0.", "mtp_num_hidden_layers",
                   {"self_attn.q_proj.weight": (128, H), "self_attn.o_proj.weight": (H, 64)},
                   {"mtp.fc.weight": (H, 2 * H), "mtp.pre_fc_norm_embedding.weight": (H,),
                    "mtp.pre_fc_norm_hidden.weight": (H,), "mtp.norm.weight": (H,)}),
    # the router's correction bias is stored as mlp.e_score_correction_bias (renamed on load)
    "exaone_moe": ("model.layers.", "mtp.layers.0.", "num_nextn_predict_layers", {},
                   {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,)}),
    "qwen3_5_moe": ("model.language_model.layers.", "mtp.layers.0.", "mtp_num_hidden_layers", {},
                    {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,)}),
    "qwen3_5_moe_text": ("model.layers.", "mtp.layers.0.", "mtp_num_hidden_layers", {},
                         {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,)}),
    "deepseek_v32": ("model.layers.", "model.layers.3.", "num_nextn_predict_layers",
                     {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H)}, {}),
    "glm_moe_dsa": ("model.layers.", "model.layers.3.", "num_nextn_predict_layers",
                    {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H)}, {}),
    "glm4_moe": ("model.layers.", "model.layers.3.", "num_nextn_predict_layers",
                 {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H)}, {}),
    "mimo_v2_flash": ("model.layers.", "model.mtp.layers.0.", "num_nextn_predict_layers",
                      {"enorm.weight": (H,), "eh_proj.weight": (H, 2 * H)}, {}),
}
FAST = {"deepseek_v3", "qwen3_next"}
EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


def _with_mtp(model_type: str, src, dst, last: int = 2):
    """Copy the tiny checkpoint `src` to `dst` with a synthetic MTP layer: decoder layer `last`'s tensors
    (random values, same names and shapes) under the MTP prefix, plus the family's extra tensors."""
    decoder, prefix, field, extra, other = SPECS[model_type]
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    template = f"{decoder}{last}."
    for k, v in list(state.items()):
        if k.startswith(template):
            state[prefix + k[len(template):]] = torch.randn(v.shape, generator=g)
    for k, shape in extra.items():
        state[prefix + k] = torch.randn(shape, generator=g)
    for k, shape in other.items():
        state[k] = torch.randn(shape, generator=g)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    section = config.get("text_config", config)
    section[field] = 1
    (dst / "config.json").write_text(json.dumps(config))
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            model = save_tiny_checkpoint(model_type, root / f"{model_type}-plain")
            state = _with_mtp(model_type, root / f"{model_type}-plain", root / model_type)
            cache[model_type] = (root / model_type, state, model)
        return cache[model_type]

    return get


def _mtp_keys(model_type, keys):
    _, prefix, _, _, other = SPECS[model_type]
    return {k for k in keys if k.startswith(prefix) or k in other}


def _both_ways(src, plan, tmp_path, **kw):
    out_l = api.apply_checkpoint(src, plan, tmp_path / "layerwise", layerwise=True, progress=False, **kw)
    out_m = api.apply_checkpoint(src, plan, tmp_path / "in_memory", layerwise=False, progress=False, **kw)
    after_l, after_m = saved_tensors(out_l), saved_tensors(out_m)
    assert set(after_l) == set(after_m)
    for k in after_l:
        assert torch.equal(after_l[k], after_m[k]), k
    return out_l, after_l


@pytest.mark.parametrize("model_type", [
    pytest.param(mt, marks=() if mt in FAST else pytest.mark.slow) for mt in sorted(SPECS)])
def test_mtp_layer_is_carried_with_the_last_layers_kept_experts(model_type, checkpoints, tmp_path):
    src, before, model = checkpoints(model_type)
    _, prefix, field, _, other = SPECS[model_type]
    plan = manual_plan(model, keep=KEEP)
    last = max(lp.layer for lp in plan.layers)
    out, after = _both_ways(src, plan, tmp_path)

    mtp_in, mtp_out = _mtp_keys(model_type, before), _mtp_keys(model_type, after)
    # per-expert keys renumbered 0..E'-1 over the kept experts, the rest one for one
    expected = {k for k in mtp_in if not EXPERT_KEY.search(k)}
    expected |= {EXPERT_KEY.sub(f".experts.{j}.", k) for k in mtp_in for j, e in enumerate(KEEP)
                 if EXPERT_KEY.search(k) and int(EXPERT_KEY.search(k).group(1)) == e}
    assert mtp_out == expected
    routed = 0
    for k in mtp_out:
        m = EXPERT_KEY.search(k)
        if m and ".mlp.experts." in k:  # new expert j is old expert KEEP[j]
            source = EXPERT_KEY.sub(f".experts.{KEEP[int(m.group(1))]}.", k)
            assert torch.equal(after[k], before[source]), k
            routed += 1
        elif k.endswith(("mlp.gate.weight", "e_score_correction_bias")):  # router rows: the kept set
            assert after[k].shape[0] == len(KEEP)
            assert torch.equal(after[k], before[k][KEEP]), k
        else:  # eh_proj, norms, attention, shared experts, embed/head copies, mtp.fc: as stored
            assert torch.equal(after[k], before[k]), k
    assert routed == 3 * len(KEEP)
    assert any(k.endswith("mlp.gate.weight") for k in mtp_out)
    assert set(other) <= mtp_out

    recorded = json.loads((out / "moeprune_plan.json").read_text())["mtp"]
    assert recorded["layers"] == [prefix] and recorded["plan_from_layer"] == last
    assert "MTP layers carried" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config.get("text_config", config)[field] == 1

    # stock transformers still loads it; the MTP tensors are the only keys it does not place
    auto_name, cls = compat.model_class(tf.AutoConfig.from_pretrained(out))
    reloaded, info = getattr(tf, auto_name).from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert get_adapter(reloaded.config).num_experts == len(KEEP)


def test_a_merge_plan_merges_the_mtp_experts_and_router_rows_with_the_groups_coefficients(checkpoints,
                                                                                          tmp_path):
    src, before, model = checkpoints("deepseek_v3")
    groups = [([0, 1], [0.25, 0.75]), ([2], [1.0]), ([4, 6], [0.5, 0.5]), ([5, 7], [0.6, 0.4])]
    plan = manual_plan(model, groups=groups)
    _, after = _both_ways(src, plan, tmp_path)
    prefix = SPECS["deepseek_v3"][1]
    for j, (members, coeffs) in enumerate(groups):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = after[f"{prefix}mlp.experts.{j}.{proj}.weight"]
            want = sum(c * before[f"{prefix}mlp.experts.{e}.{proj}.weight"].double()
                       for e, c in zip(members, coeffs))
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
        for name in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
            want = sum(c * before[prefix + name][e].double() for e, c in zip(members, coeffs))
            torch.testing.assert_close(after[prefix + name][j].double(), want, rtol=0, atol=1e-6)
    # the MTP layer's merge is not the decoder layer's: its own weights went in
    assert not torch.equal(after[f"{prefix}mlp.experts.0.up_proj.weight"],
                           after["model.layers.2.mlp.experts.0.up_proj.weight"])


def test_a_novice_plan_prunes_the_mtp_layer_to_the_kept_experts(checkpoints, tmp_path):
    src, before, model = checkpoints("qwen3_next")
    plan = manual_plan(model, keep=KEEP)
    for lp in plan.layers:
        lp.novices = [e for e in range(E) if e not in KEEP]
        lp.notes["novice_vectors"] = "zero"  # no statistics needed
    out, after = _both_ways(src, plan, tmp_path)
    prefix = SPECS["qwen3_next"][1]
    assert torch.equal(after[f"{prefix}mlp.gate.weight"], before[f"{prefix}mlp.gate.weight"][KEEP])
    assert not any(k.startswith(f"{prefix}mlp.experts.{len(KEEP)}.") for k in after)
    recorded = json.loads((out / "moeprune_plan.json").read_text())["mtp"]
    assert recorded["novices_pruned"] == plan.layers[-1].novices


def test_prune_carries_the_mtp_layer_with_the_plan_it_made(checkpoints, tmp_path):
    src, before, _ = checkpoints("qwen3_next")
    out = api.prune(src, "random", tmp_path / "out", experts=4, progress=False, layerwise=True)
    plan = Plan.load(out / "moeprune_plan.json")
    last = plan.layer(plan.mtp["plan_from_layer"])
    assert last.layer == max(lp.layer for lp in plan.layers)
    prefix = SPECS["qwen3_next"][1]
    after = saved_tensors(out)
    assert torch.equal(after[f"{prefix}mlp.gate.weight"], before[f"{prefix}mlp.gate.weight"][last.kept])


def test_a_checkpoint_without_mtp_tensors_writes_none(checkpoints, tmp_path):
    src, _, model = checkpoints("deepseek_v3")
    plain = src.parent / "deepseek_v3-plain"  # its config announces one MTP layer, its files hold none
    assert json.loads((plain / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not ShardedCheckpoint(plain).mtp
    out, after = _both_ways(plain, manual_plan(model, keep=KEEP), tmp_path)
    assert not any(k.startswith("model.layers.3.") for k in after)
    assert "mtp" not in json.loads((out / "moeprune_plan.json").read_text())
    assert "MTP" not in (out / "README.md").read_text()


def test_mtp_experts_that_do_not_fit_the_decoders_are_refused_before_any_weight_is_read(checkpoints,
                                                                                       tmp_path):
    src, _, model = checkpoints("deepseek_v3")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.3.mlp.experts.5.up_proj.weight"] = torch.zeros(32, H)  # another width
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    says = "MTP layer's model.layers.3.mlp.experts.5.up_proj.weight has shape"
    with pytest.raises(MoepruneError, match=says) as e:
        api.apply_checkpoint(bad, manual_plan(model, keep=KEEP), tmp_path / "out", layerwise=True,
                             progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match=says):
        api.prune(bad, "random", tmp_path / "out", experts=4, progress=False, layerwise=True)
    assert not (tmp_path / "out").exists()


def test_an_unknown_tensor_outside_any_mtp_layer_is_still_refused(checkpoints, tmp_path):
    src, _, _ = checkpoints("deepseek_v3")
    odd = tmp_path / "odd"
    shutil.copytree(src, odd)
    state = load_file(odd / "model.safetensors")
    state["model.foo.weight"] = torch.zeros(4)
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoepruneError, match="has no place for"):
        ShardedCheckpoint(odd)


def test_a_layer_plan_of_another_layer_is_not_taken(checkpoints):
    src, _, _ = checkpoints("deepseek_v3")
    carrier = ShardedCheckpoint(src).mtp_carrier()
    assert carrier.last == 2 and carrier.layout.layers == {"model.layers.3.": carrier.layout.layers[
        "model.layers.3."]}
    with pytest.raises(ValueError, match="layer 2"):
        next(carrier.shards(LayerPlan(1, E, [Group([e], [1.0]) for e in KEEP])))


def test_find_mtp_reads_both_layouts_and_leaves_model_tensors_and_other_keys_alone():
    from moeprune.store.mtp import find_mtp

    model_keys = ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
                  "lm_head.weight"]
    on_disk = {
        "model.layers.0.mlp.gate.weight": "model.layers.0.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight": "model.layers.1.mlp.experts.gate_up_proj",
        "lm_head.weight": "lm_head.weight",
        "model.layers.2.eh_proj.weight": "model.layers.2.eh_proj.weight",  # appended layer (n >= 2)
        "model.layers.2.mlp.experts.0.up_proj.weight": "model.layers.2.mlp.experts.gate_up_proj",
        "mtp.layers.0.mlp.gate.weight": "mtp.layers.0.mlp.gate.weight",
        "model.mtp.layers.1.input_layernorm.weight": "model.mtp.layers.1.input_layernorm.weight",
        "mtp.0.mlp.gate.weight": "mtp.0.mlp.gate.weight",
        "mtp.fc.weight": "mtp.fc.weight",
        "model.vision.extra": "model.vision.extra",  # neither: left for the caller to refuse
    }
    layout = find_mtp(on_disk, set(model_keys), "model.layers.", 2)
    assert layout.decoder_prefix == "model.layers."
    assert layout.layers == {
        "model.layers.2.": ["model.layers.2.eh_proj.weight", "model.layers.2.mlp.experts.0.up_proj.weight"],
        "mtp.layers.0.": ["mtp.layers.0.mlp.gate.weight"],
        "model.mtp.layers.1.": ["model.mtp.layers.1.input_layernorm.weight"],
        "mtp.0.": ["mtp.0.mlp.gate.weight"],
    }
    assert layout.other == ["mtp.fc.weight"] and layout.num_shards == 5
    assert "model.vision.extra" not in layout.keys and not find_mtp(
        {k: k for k in model_keys}, set(model_keys), "model.layers.", 2)
    with pytest.raises(MoepruneError, match="outside an MTP layer"):
        find_mtp({**on_disk, "mtp.experts.0.w1.weight": "x"}, set(model_keys), "model.layers.", 2)


@pytest.mark.parametrize("layerwise", [True, False])
def test_mtp_tensors_do_not_change_what_the_calibration_pass_sees(checkpoints, tmp_path, layerwise):
    from helpers import calibration_text

    src, _, _ = checkpoints("qwen3_next")
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text()[:4000])
    kw = dict(samples=2, seq_len=16, batch_size=2, probe_size=8, progress=False, layerwise=layerwise)
    with_mtp = api.observe_checkpoint(src, str(calib), **kw)
    plain = api.observe_checkpoint(src.parent / "qwen3_next-plain", str(calib), **kw)
    assert sorted(with_mtp.layers) == sorted(plain.layers)
    for i, ls in with_mtp.layers.items():
        assert ls.experts.count.sum() > 0
        assert torch.equal(ls.experts.count, plain.layers[i].experts.count)
        assert torch.equal(ls.experts.mean, plain.layers[i].experts.mean)


def test_the_plans_mtp_record_survives_json_and_is_type_checked(checkpoints):
    _, _, model = checkpoints("deepseek_v3")
    plan = manual_plan(model, keep=KEEP)
    assert "mtp" not in plan.to_dict()  # plans of models without MTP layers keep their JSON
    plan.mtp = {"layers": ["model.layers.3."], "plan_from_layer": 2}
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(MoepruneError, match="mtp must be an object"):
        Plan.from_dict({**plan.to_dict(), "mtp": []})
