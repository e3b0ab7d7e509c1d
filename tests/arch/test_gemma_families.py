"""Gemma 4: its experts read `pre_feedforward_layernorm_2(x)` while its router reads x, and every method
that runs the experts on calibration tokens must see what the experts really receive."""

from __future__ import annotations

import pytest
import torch
from helpers import token_ids

from moeprune import api
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.observe.observer import observe
from moeprune.pipeline.access import ModelWeights

N, L = 4, 32  # calibration sequences, tokens each: one batch, every token probed


def _gemma4():
    """Tiny Gemma 4 whose expert-input norm has non-unit weights, so it is not the router's own norm."""
    model = tiny_model("gemma4_text")
    adapter = get_adapter(model.config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in adapter.moe_blocks(model).values():
            norm = block.pre_feedforward_layernorm_2
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 3 + 0.1)
    return model, adapter


def _observe_and_capture(model, adapter):
    """(stats, per layer the experts' real (input [T, H], top_k_index [T, K], output [T, H]))."""
    seen = {}
    handles = []
    for i, block in adapter.moe_blocks(model).items():
        def grab(module, args, out, i=i):
            seen[i] = (args[0].detach().clone(), args[1].clone(), out.detach().clone())
        handles.append(adapter.experts(block).register_forward_hook(grab))
    try:
        stats = observe(model, token_ids(N, L), batch_size=N, probe_size=N * L)
    finally:
        for h in handles:
            h.remove()
    return stats, seen


@pytest.fixture(scope="module")
def observed():
    model, adapter = _gemma4()
    stats, seen = _observe_and_capture(model, adapter)
    return model, adapter, stats, seen


def test_the_experts_input_from_the_probe_is_what_the_experts_receive(observed):
    model, adapter, stats, seen = observed
    blocks = adapter.moe_blocks(model)
    assert sorted(blocks) == [0, 1, 2] and adapter.num_experts == 8 and adapter.top_k == 2
    for i, block in blocks.items():
        x = stats.layers[i].probe.inputs  # [T, H] the MoE input: what the router reads
        received = seen[i][0]  # [T, H] what the experts module received
        with torch.no_grad():
            assert torch.equal(adapter.expert_inputs(block, x), received)
        # and the norm matters: the router's input is not what the experts receive
        assert (x - received).abs().max() > 0.1


def test_observed_expert_statistics_are_of_the_experts_real_input(observed):
    model, adapter, stats, seen = observed
    for i, block in adapter.moe_blocks(model).items():
        received, ids, _ = seen[i]
        ex = stats.layers[i].experts
        for e in range(8):
            rows = (ids == e).any(dim=-1).nonzero().squeeze(1)
            assert int(ex.count[e]) == rows.numel()
            if not rows.numel():
                continue
            one = torch.full((rows.numel(),), e)
            raw = adapter.expert_outputs(block, received[rows], one)  # [n, H]
            assert torch.allclose(ex.mean[e].float(), raw.mean(dim=0), atol=1e-5)


def test_weight_space_methods_run_the_experts_on_what_they_receive(observed):
    """HC-SMoE's and DEK's representation (every expert on every probe token) and NAEE's block output."""
    model, adapter, stats, seen = observed
    weights = ModelWeights(model)
    for i, block in adapter.moe_blocks(model).items():
        received, _, routed_sum = seen[i]
        x = stats.layers[i].probe.inputs
        access = weights.layer(i)
        every = access.expert_outputs(x)  # [E, T, H]
        for e in (0, 5):
            direct = adapter.expert_outputs(block, received, torch.full((received.shape[0],), e))
            assert torch.allclose(every[e], direct, atol=1e-6)
            wrong = adapter.expert_outputs(block, x, torch.full((x.shape[0],), e))  # the router's input
            assert not torch.allclose(every[e], wrong, atol=1e-3)
        assert torch.allclose(access.block_output(x), routed_sum, atol=1e-5)


@pytest.mark.parametrize("method,options", [("hc_smoe", {}), pytest.param("naee", {}, marks=pytest.mark.slow),
                                            ("dek", {"coefficients": "learned", "learn_steps": 3})])
def test_a_plan_from_gemma4_statistics_prunes_and_runs(observed, method, options):
    """Block evaluations (NAEE's lookup, DEK's learned merge on a differentiable copy) run Gemma 4's MoE."""
    model, adapter, stats, _ = observed
    plan = api.make_plan_for(stats, method, experts=4, weights=ModelWeights(model), options=options)
    assert [lp.layer for lp in plan.layers] == [0, 1, 2]
    if method == "naee":  # the lookup path reproduces the block: Gemma 4's MoE lines, not the layer
        assert all(lp.notes["evaluation"] == "fast" for lp in plan.layers), plan.layers[0].notes


def test_gemma4_layer_by_layer_statistics_equal_the_whole_model(checkpoint):
    """The per-layer inputs (PLE) and masks reach each layer in the walk as in the model."""
    from moeprune.pipeline import observe_layerwise
    from moeprune.store.checkpoint import load_model

    path = checkpoint("gemma4_text")
    ids = token_ids(4, 24)
    whole = observe(load_model(path), ids, batch_size=2, probe_size=40, seed=0)
    layerwise = observe_layerwise(path, ids, batch_size=2, probe_size=40, seed=0)
    for i in whole.layers:
        a, b = whole.layers[i], layerwise.layers[i]
        assert torch.equal(a.experts.mean, b.experts.mean) and torch.equal(a.probe.inputs, b.probe.inputs)


# ---- Inkling 2 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("per_block", [1, 2])  # 2: layer 1 is no block boundary, its input is not carried
def test_inkling2_layer_by_layer_statistics_equal_the_whole_model(checkpoint, per_block):
    """Its layers read earlier boundary layers' inputs (block_states): the walk carries them as the model's
    loop does."""
    from moeprune.pipeline import observe_layerwise
    from moeprune.store.checkpoint import load_model

    path = checkpoint("inkling2_text", n_layers_per_attn_res_block=per_block)
    model = load_model(path)
    assert [layer.is_block_boundary for layer in model.model.layers] == [True, per_block == 1, True]
    ids = token_ids(4, 24)
    whole = observe(model, ids, batch_size=2, probe_size=40, seed=0)
    layerwise = observe_layerwise(path, ids, batch_size=2, probe_size=40, seed=0)
    assert sorted(layerwise.layers) == [0, 1, 2]
    for i in whole.layers:
        a, b = whole.layers[i], layerwise.layers[i]
        assert torch.equal(a.experts.count, b.experts.count), i
        torch.testing.assert_close(a.experts.mean, b.experts.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.probe.inputs, b.probe.inputs, rtol=1e-5, atol=1e-6)


def test_inkling2_perplexity_through_the_layer_walk_equals_the_model(checkpoint, calib_file):
    """The model's head reads the final block_states too: the walk hands the last layer's to it."""
    from moeprune.evaluate.perplexity import perplexity
    from moeprune.pipeline.run import perplexities
    from moeprune.pipeline.sources import CheckpointSource
    from moeprune.store.checkpoint import load_tokenizer

    path = checkpoint("inkling2_text", n_layers_per_attn_res_block=2)
    model, tok = load_model_of(path), load_tokenizer(path)
    whole = perplexity(model, tok, calib_file, seq_len=32, max_tokens=128, batch_size=2)
    (walked,), _ = perplexities(CheckpointSource(path), tok, [calib_file], seq_len=32, max_tokens=128)
    assert walked["windows"] == whole["windows"] == 4
    assert walked["nll"] == pytest.approx(whole["nll"], rel=1e-6)


def test_inkling2_prunes_with_a_calibrated_method(checkpoint, calib_file, tmp_path):
    """REAP, layer by layer and in memory, writes the same model, which reloads and runs."""
    path = checkpoint("inkling2_text", n_layers_per_attn_res_block=2)
    outs = [api.prune(path, "reap", tmp_path / str(layerwise), experts=4, calib=str(calib_file), samples=4,
                      seq_len=16, progress=False, layerwise=layerwise) for layerwise in (True, False)]
    walked, whole = (load_model_of(out) for out in outs)
    assert get_adapter(walked.config).num_experts == 4
    for (name, a), (_, b) in zip(walked.state_dict().items(), whole.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        assert torch.isfinite(walked(input_ids=token_ids(1, 16)).logits).all()


def test_inkling2_softmax_scoring_is_not_claimed_exact():
    model = tiny_model("inkling2_text")
    adapter = get_adapter(model.config)
    assert adapter.survivors_exact()[0]
    model.config.scoring_func = "softmax"
    exact, why = get_adapter(model.config).survivors_exact()
    assert not exact and "softmax" in why


def load_model_of(path):
    from moeprune.store.checkpoint import load_model

    return load_model(path)


# ---- dots.3 note -------------------------------------------------------------------------------

@pytest.mark.slow
def test_dots3_note_prunes_the_language_model_only(checkpoint, tmp_path):
    """Its vision tower has routed experts too (4 here); they keep their count and every bit."""
    from helpers import manual_plan, saved_tensors

    path = checkpoint("dots3_note")
    model = load_model_of(path)
    assert any(".experts." in n and "vision" in n for n, _ in model.named_parameters())
    out = api.apply_checkpoint(path, manual_plan(model, keep=[0, 1, 4, 5]), tmp_path / "out", layerwise=True,
                               progress=False)
    before, after = saved_tensors(path), saved_tensors(out)
    vision = [k for k in before if "vision" in k]
    assert any(".experts." in k for k in vision)
    for k in vision:
        assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), k
    reloaded = load_model_of(out)
    assert reloaded.config.vision_config.num_local_experts == model.config.vision_config.num_local_experts
    assert get_adapter(reloaded.config).num_experts == 4
    adapter = get_adapter(reloaded.config)
    blocks = adapter.moe_blocks(reloaded)
    assert sorted(blocks) == [1, 2]  # layer 0 is dense
    assert all(adapter.experts(b).gate_up_proj.shape[0] == 4 for b in blocks.values())


def test_gemma4_per_expert_scale_is_sliced_with_the_experts():
    """A token whose top-k all survive gets the same routed sum, with non-unit per-expert scales."""
    import copy

    from moeprune.plan import Group, LayerPlan
    from moeprune.surgery import apply_layer_plan

    model, adapter = _gemma4()
    keep = [1, 2, 5, 6]
    x = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(2))
    for i, block in adapter.moe_blocks(model).items():
        router = adapter.router(block)
        with torch.no_grad():
            router.per_expert_scale.copy_(torch.arange(1, 9, dtype=torch.float32))
            before = adapter.moe_forward(block, x)[0]  # [T, H]
            ids = router(x[0])[2]  # [T, K]
        pruned = copy.deepcopy(block)
        apply_layer_plan(adapter, pruned, LayerPlan(i, 8, [Group([e], [1.0]) for e in keep]))
        assert torch.equal(adapter.router(pruned).per_expert_scale, torch.tensor([2.0, 3.0, 6.0, 7.0]))
        with torch.no_grad():
            after = adapter.moe_forward(pruned, x)[0]
        survived = torch.isin(ids, torch.tensor(keep)).all(dim=-1)
        assert survived.sum() >= 4
        torch.testing.assert_close(after[survived], before[survived], rtol=0, atol=1e-5)
        assert not torch.allclose(after[~survived], before[~survived], atol=1e-3)
