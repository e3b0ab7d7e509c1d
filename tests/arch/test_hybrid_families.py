"""Hybrid families (Mamba / linear-attention layers beside attention): jamba, granitemoehybrid, kimi_linear,
bailing_hybrid, nemotron_h. The battery in test_every_family.py covers each one's tiny model; here: that
the tiny models really are hybrids with several MoE layers, and Nemotron-H's new logic, non-gated relu²
experts and experts in a latent space between two shared projections (`moe_latent_size`).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from helpers import manual_plan, saved_tensors, token_ids

from moeprune import api
from moeprune.arch import decoder_layers, get_adapter
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.observe import observe
from moeprune.pipeline import forward_layerwise, observe_layerwise
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.store.checkpoint import load_model
from moeprune.surgery import apply_layer_plan, apply_plan
from moeprune.surgery.alignment import permute_expert_hidden

HYBRIDS = ["jamba", "granitemoehybrid", "kimi_linear", "bailing_hybrid", "nemotron_h"]
LATENT = 32  # experts' width D in the latent Nemotron-H, hidden 64
KEEP = [0, 1, 4, 5]  # two per routing group (n_group = 2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_tiny_hybrids_have_both_layer_kinds_and_several_moe_layers(model_type):
    model = tiny_model(model_type)
    kinds = list(model.config.layer_types)
    assert "linear_attention" in kinds and "full_attention" in kinds, kinds
    blocks = get_adapter(model.config).moe_blocks(model)
    assert len(blocks) >= 2 and len(decoder_layers(model)[0]) <= 4
    if model_type != "nemotron_h":  # Nemotron-H layers are one mixer each: MoE layers are their own kind
        assert {kinds[i] for i in blocks} == {"linear_attention", "full_attention"}, (kinds, sorted(blocks))


@pytest.mark.slow
@pytest.mark.parametrize("model_type,overrides", [(mt, {}) for mt in HYBRIDS]
                         + [("nemotron_h", {"moe_latent_size": LATENT})])
def test_layer_by_layer_statistics_and_hidden_states_equal_the_whole_model(model_type, overrides, checkpoint):
    """Mamba / linear-attention layers get their own masks and arguments from the model's forward."""
    path = checkpoint(model_type, **overrides)
    ids = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    model = load_model(path)
    whole = observe(model, ids, batch_size=2, probe_size=40, seed=0)
    layerwise = observe_layerwise(path, ids, batch_size=2, probe_size=40, seed=0)
    assert sorted(whole.layers) == sorted(layerwise.layers)
    for i, ls in whole.layers.items():
        for k, v in ls.experts.tensors().items():
            assert torch.equal(v, layerwise.layers[i].experts.tensors()[k]), (i, k)
        assert torch.equal(ls.probe.inputs, layerwise.layers[i].probe.inputs)
        assert torch.equal(ls.probe.router_logits, layerwise.layers[i].probe.router_logits)
    layers, _ = decoder_layers(model)
    got = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: got.append(out[0] if isinstance(out, tuple)
                                                                            else out))
    with torch.no_grad():
        model(input_ids=ids[:2], use_cache=False)
        model(input_ids=ids[2:], use_cache=False)
    handle.remove()
    assert torch.equal(forward_layerwise(path, ids, batch_size=2), torch.cat(got))


def test_nemotron_h_experts_are_non_gated_and_latent_ones_live_in_the_latent_space():
    plain, latent = tiny_model("nemotron_h"), tiny_model("nemotron_h", moe_latent_size=LATENT)
    for model, D in ((plain, 64), (latent, LATENT)):
        adapter = get_adapter(model.config)
        block = next(iter(adapter.moe_blocks(model).values()))
        w = adapter.expert_weights(block, 3)
        assert not adapter.gated and w.gate is None
        assert adapter.expert_dim == D and w.up.shape == (64, D) and w.down.shape == (D, 64)
        x = torch.randn(5, 64)
        assert adapter.expert_inputs(block, x).shape == (5, D)


def test_a_non_gated_merge_averages_up_and_down_and_alignment_keeps_each_expert():
    model = tiny_model("nemotron_h", moe_latent_size=LATENT)
    adapter = get_adapter(model.config)
    layer, block = next(iter(adapter.moe_blocks(model).items()))
    ex = adapter.experts(block)
    up, down = ex.up_proj.detach().clone(), ex.down_proj.detach().clone()
    merged = copy.deepcopy(block)
    groups = [Group([0, 1], [0.25, 0.75])] + [Group([e], [1.0]) for e in range(2, 8)]
    apply_layer_plan(adapter, merged, LayerPlan(layer, 8, groups))
    got = adapter.experts(merged)
    torch.testing.assert_close(got.up_proj[0], 0.25 * up[0] + 0.75 * up[1])
    torch.testing.assert_close(got.down_proj[0], 0.25 * down[0] + 0.75 * down[1])
    assert got.up_proj.shape[0] == 7 and torch.equal(got.up_proj[1:], up[2:])

    # permuting one expert's hidden units (up rows, down columns) leaves what it computes unchanged
    x = torch.randn(12, LATENT)
    ids = torch.full((12,), 2)
    before = adapter.expert_outputs(block, x, ids)
    tensors = {"up_proj": up.clone(), "down_proj": down.clone()}
    perm = torch.randperm(up.shape[1], generator=torch.Generator().manual_seed(0)).tolist()
    permute_expert_hidden(adapter, tensors, 2, perm)
    assert not torch.equal(tensors["up_proj"][2], up[2])
    with torch.no_grad():
        ex.up_proj.copy_(tensors["up_proj"])
        ex.down_proj.copy_(tensors["down_proj"])
    torch.testing.assert_close(adapter.expert_outputs(block, x, ids), before, rtol=1e-5, atol=1e-6)


def test_latent_nemotron_h_observes_expert_outputs_in_the_latent_space():
    model = tiny_model("nemotron_h", moe_latent_size=LATENT)
    stats = observe(model, token_ids(n=4, length=32), probe_size=32)
    for ls in stats.layers.values():
        assert ls.experts.mean.shape == (8, LATENT)
        assert ls.probe.inputs.shape == (32, 64)  # the router's inputs, not the experts'
        assert float(ls.experts.count.sum()) == 4 * 32 * 2
    assert stats.model["expert_dim"] == LATENT


def test_latent_nemotron_h_surviving_routes_are_exact_through_the_shared_projections():
    model = tiny_model("nemotron_h", moe_latent_size=LATENT)
    adapter = get_adapter(model.config)
    exact, why = adapter.survivors_exact()
    assert exact, why
    torch.manual_seed(3)
    for layer, block in adapter.moe_blocks(model).items():
        x = torch.randn(1, 256, 64)
        seen = {}

        def grab(module, args, seen=seen):
            seen.setdefault("ids", args[1])  # returns None: the experts' arguments stay as they are

        handle = adapter.experts(block).register_forward_pre_hook(grab)
        with torch.no_grad():
            before = block(x).reshape(-1, 64)
        handle.remove()
        survived = torch.isin(seen["ids"], torch.tensor(KEEP)).all(dim=-1)  # [T]
        assert survived.sum() >= 4
        pruned = copy.deepcopy(block)
        apply_layer_plan(adapter, pruned, LayerPlan(layer, 8, [Group([e], [1.0]) for e in KEEP]))
        with torch.no_grad():
            after = pruned(x).reshape(-1, 64)
        assert (after[survived] - before[survived]).abs().max() <= 1e-5
        assert not torch.allclose(after[~survived], before[~survived])


@pytest.mark.slow
def test_latent_nemotron_h_prunes_layer_by_layer_as_in_memory_and_keeps_the_projections(tmp_path):
    src = tmp_path / "src"
    original = save_tiny_checkpoint("nemotron_h", src, moe_latent_size=LATENT)
    plan = manual_plan(original, keep=KEEP)
    out = api.apply_checkpoint(src, plan, tmp_path / "out", layerwise=True, progress=False)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert reloaded.config.moe_latent_size == LATENT and reloaded.config.n_routed_experts == 4
    in_memory = apply_plan(copy.deepcopy(original), plan)
    mem = in_memory.state_dict()
    for name, tensor in reloaded.eval().state_dict().items():
        assert torch.equal(tensor, mem[name]), name
    ids = token_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(in_memory, ids), rtol=0, atol=1e-6)
    before, after = saved_tensors(src), saved_tensors(out)
    projections = [k for k in before if "latent_proj" in k]
    assert len(projections) == 4  # fc1 and fc2 of both MoE layers, written as they were
    assert all(torch.equal(after[k], before[k]) for k in projections)


@pytest.mark.slow
@pytest.mark.parametrize("latent", [None, LATENT])
@pytest.mark.parametrize("method,options", [
    ("hc_smoe", {}),
    ("dek", {"representation": "weight"}),
    ("dek", {"representation": "surrogate", "coefficients": "learned", "learn_steps": 3}),
    ("uncurl", {}),
    ("mone", {}),
])
def test_nemotron_h_merged_or_novice_checkpoints_run(method, options, latent, calib_file, tmp_path):
    src = tmp_path / "src"
    save_tiny_checkpoint("nemotron_h", src, moe_latent_size=latent)
    out = api.prune(src, method, tmp_path / "out", experts=4, calib=str(calib_file), samples=4, seq_len=32,
                    probe_size=64, progress=False, options=options)  # novices keep the routing groups
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.num_experts_out == 4
    if method != "mone":
        assert any(len(g.members) > 1 for lp in plan.layers for g in lp.groups), "a merge, not a pruning"
        model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        model = load_model(out)  # the stock part plus the novice file
    assert get_adapter(model.config).num_experts in (4, 8)
    logits = _logits(model, token_ids())
    assert logits.shape == (2, 16, 1024) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_a_checkpoint_with_an_mtp_stack_the_model_class_ignores_prunes_layer_by_layer(tmp_path):
    """Nemotron-H checkpoints carry an MTP stack (`mtp.*`) the model class does not build and
    `from_pretrained` ignores; layer by layer it is carried as stored (store/mtp.py) instead of refusing the
    checkpoint, and the output still loads."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    original = save_tiny_checkpoint("nemotron_h", src)
    weights = src / "model.safetensors"
    tensors = load_file(weights)
    tensors["mtp.layers.0.norm.weight"] = torch.ones(64)
    save_file(tensors, weights, metadata={"format": "pt"})
    plan = manual_plan(original, keep=KEEP)
    out = api.apply_checkpoint(src, plan, tmp_path / "out", layerwise=True, progress=False)
    written = saved_tensors(out)
    assert torch.equal(written["mtp.layers.0.norm.weight"], torch.ones(64))
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, in_memory = token_ids(), apply_plan(copy.deepcopy(original), plan)
    torch.testing.assert_close(_logits(reloaded.eval(), ids), _logits(in_memory, ids), rtol=0, atol=1e-6)


def test_latent_routed_sums_are_in_the_blocks_space_so_naees_fast_path_is_exact():
    from moeprune.methods.naee import pruning_layer_plan
    from moeprune.pipeline.access import LayerAccess

    model = tiny_model("nemotron_h", moe_latent_size=LATENT)
    adapter = get_adapter(model.config)
    layer, block = next(iter(adapter.moe_blocks(model).items()))
    access = LayerAccess(adapter, block, layer)
    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    lookup = access.routed_lookup(x)
    full = access.block_output(x)  # [n, H]
    for subset in ([0, 1, 4, 5], [2, 3, 6, 7]):
        want = full - access.block_output(x, pruning_layer_plan(layer, 8, subset))
        got = lookup(list(range(8))) - lookup(subset)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
