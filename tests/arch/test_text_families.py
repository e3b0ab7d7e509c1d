"""What the plain text families and their wrappers need beyond the every-family battery: layer-by-layer work
on the short-conv hybrid (LFM2-MoE) and the hyper-connection hybrid (Qwen4-Exp), Hunyuan's per-layer top-k,
the Mistral 4 routing rule, LFM2's block expert bias, and the model types refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from helpers import manual_plan, token_ids

from moeprune import api
from moeprune.arch import get_adapter
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.compat import config_class
from moeprune.errors import MoepruneError
from moeprune.observe import observe
from moeprune.pipeline import forward_layerwise, observe_layerwise
from moeprune.plan import Group, LayerPlan, budget
from moeprune.store.checkpoint import load_model
from moeprune.surgery import apply_layer_plan, apply_plan

KEEP = [0, 1, 4, 5]


def _ids(n=5, length=24, seed=0):
    return torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(seed))


# ---- hybrids, layer by layer ---------------------------------------------------------------------
@pytest.mark.slow
# short-conv and Gated DeltaNet hybrids, hyper-connection streams, sliding layers, DSA layers that hand their
# top-k token indices to the next layer
@pytest.mark.parametrize("family", ["lfm2_moe", "qwen4_exp_text", "qwen4_exp", "hy_v4", "step3p7",
                                    "minimax_m3_vl", "mistral_large4", "glm_moe_dsa", "glm5_next"])
def test_layerwise_stats_and_forward_equal_the_whole_model(family, checkpoint):
    path = checkpoint(family)
    model = load_model(path)
    ids = _ids()
    if family == "lfm2_moe":  # short-conv layers hold MoE blocks too
        kinds = {model.config.layer_types[i] for i in get_adapter(model.config).moe_blocks(model)}
        assert kinds == {"conv", "full_attention"}
    whole = observe(model, ids, batch_size=2, probe_size=40, seed=0)
    layerwise = observe_layerwise(path, ids, batch_size=2, probe_size=40, seed=0)
    assert sorted(whole.layers) == sorted(layerwise.layers) and whole.layers
    # the same routes; float sums may differ in the last bits where hidden-state streams are re-laid out
    # between layers (Hy4's hyper-connections)
    for i in whole.layers:
        a, b = whole.layers[i].experts.tensors(), layerwise.layers[i].experts.tensors()
        assert torch.equal(a["count"], b["count"])
        for k, v in a.items():
            torch.testing.assert_close(v, b[k], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(whole.layers[i].probe.router_logits,
                                   layerwise.layers[i].probe.router_logits, rtol=1e-6, atol=1e-7)

    from moeprune.arch import decoder_layers

    layers, _ = decoder_layers(model)
    got = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: got.append(out[0] if isinstance(out, tuple)
                                                                             else out))
    with torch.no_grad():
        for b in range(0, len(ids), 2):
            model(input_ids=ids[b:b + 2], use_cache=False)
    handle.remove()
    torch.testing.assert_close(forward_layerwise(path, ids, batch_size=2), torch.cat(got), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lfm2_prune_layer_by_layer_equals_in_memory(checkpoint, calib_file, tmp_path):
    path = checkpoint("lfm2_moe")
    args = dict(ratio=0.5, samples=6, seq_len=32, batch_size=4, probe_size=64, progress=False,
                calib=str(calib_file))
    whole = api.prune(path, "reap", tmp_path / "whole", layerwise=False, **args)
    streamed = api.prune(path, "reap", tmp_path / "streamed", layerwise=True, **args)
    a = tf.AutoModelForCausalLM.from_pretrained(whole).eval()
    b = tf.AutoModelForCausalLM.from_pretrained(streamed).eval()
    assert get_adapter(b.config).num_experts == 4
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _routes_survive(adapter, layer, block, keep):
    """Prune `block` to `keep`; the tokens whose top-k all survive get the same block output."""
    x = torch.randn(2, 64, adapter.config.hidden_size)
    ids = {}

    def grab(module, args):
        ids.setdefault("k", args[1])  # [T, K] (returning it would replace the experts' inputs)

    handle = block.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        before = block(x)
    handle.remove()
    pruned = copy.deepcopy(block)
    apply_layer_plan(adapter, pruned, LayerPlan(layer, 8, [Group([e], [1.0]) for e in keep]))
    with torch.no_grad():
        after = pruned(x)
    survived = torch.isin(ids["k"], torch.tensor(keep)).all(-1)
    assert survived.sum() >= 4
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    torch.testing.assert_close(flat(after)[survived], flat(before)[survived], rtol=0, atol=1e-6)
    return pruned


# ---- LFM2's expert bias (a block buffer, not a router tensor) -----------------------------------------
def test_lfm2_block_expert_bias_is_sliced_and_surviving_routes_stay_exact():
    model = tiny_model("lfm2_moe")
    adapter = get_adapter(model.config)
    layer, block = next(iter(adapter.moe_blocks(model).items()))
    torch.manual_seed(1)
    with torch.no_grad():
        block.expert_bias.copy_(torch.randn(8) * 0.05)
    assert any(leaf == "expert_bias" for _, leaf, _ in adapter.router_expert_tensors(block))
    bias = block.expert_bias.clone()
    pruned = _routes_survive(adapter, layer, block, KEEP)
    assert torch.equal(pruned.expert_bias, bias[KEEP])


# ---- A.X-K2: expert groups are optional ----------------------------------------------------------
def test_axk2_routes_with_or_without_expert_groups():
    plain = get_adapter(tiny_model("axk2").config)
    assert plain.config.n_group is None and plain.n_group == 1 and plain.survivors_exact()[0]
    model = tiny_model("axk2", n_group=2, topk_group=1)  # the larger releases' grouped routing
    adapter = get_adapter(model.config)
    assert adapter.n_group == 2 and adapter.survivors_exact()[0]
    torch.manual_seed(2)
    for layer, block in adapter.moe_blocks(model).items():
        _routes_survive(adapter, layer, block, KEEP)  # two experts of each group
    # an odd count would leave a group short of the two experts its score needs
    with pytest.raises(MoepruneError, match="group-limited routing"):
        budget(8, 2, experts=5, n_group=adapter.n_group, min_per_group=adapter.min_experts_per_group)
    assert budget(8, 2, experts=5, n_group=plain.n_group, min_per_group=plain.min_experts_per_group) == 5


# ---- Hunyuan: per-layer top-k ---------------------------------------------------------------------
@pytest.mark.slow
def test_hunyuan_per_layer_top_k_list_prunes_and_reloads(tmp_path):
    model = save_tiny_checkpoint("hunyuan_v1_moe", tmp_path / "src", moe_topk=[2, 1, 3])
    adapter = get_adapter(model.config)
    assert adapter.top_k == 3  # the largest layer's, which budgets check against
    assert [b.gate.top_k for b in adapter.moe_blocks(model).values()] == [2, 1, 3]
    with pytest.raises(MoepruneError, match="top-k"):
        api.prune(tmp_path / "src", "frequency", tmp_path / "bad", experts=2, progress=False)
    plan = manual_plan(model, keep=KEEP)
    out = api.apply_checkpoint(tmp_path / "src", plan, tmp_path / "out", layerwise=True, progress=False)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.moe_topk == [2, 1, 3] and reloaded.config.num_experts == 4
    in_memory = apply_plan(copy.deepcopy(model), plan)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)


# ---- Mistral 4 routing rule -----------------------------------------------------------------------
def test_mistral4_routing_rule_follows_renormalisation_and_groups():
    def exact(**text):
        config = tf.Mistral4Config(n_routed_experts=8, num_experts_per_tok=2, **text)
        return get_adapter(config).survivors_exact()

    assert exact(n_group=1, topk_group=1)[0]
    assert exact(n_group=2, topk_group=1)[0]  # the token's top-k hold its group's top-2
    assert not exact(n_group=4, topk_group=2)[0]  # a pruned second expert can demote a group
    no_renorm, why = exact(n_group=1, topk_group=1, norm_topk_prob=False)
    assert not no_renorm and "renormalisation" in why
    # Mistral Large 4's router always renormalises; its config has no norm_topk_prob
    large = get_adapter(tiny_model("mistral_large4").config)
    assert large.survivors_exact()[0] and not hasattr(large.config, "norm_topk_prob")


def test_mistral3_holding_mistral4_reads_the_text_models_experts():
    model = tiny_model("mistral3")
    assert type(model).__name__ == "Mistral3ForConditionalGeneration"
    assert model.config.text_config.model_type == "mistral4"
    adapter = get_adapter(model.config)
    assert adapter.num_experts == 8 and adapter.moe_blocks(model)
    # a stock Mistral 3 (dense Mistral text model) is told it has no experts
    with pytest.raises(MoepruneError, match="expert count") as e:
        get_adapter(tf.Mistral3Config())
    assert "\n" not in str(e.value)


# ---- refused model types --------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,says", [
    ("openai_privacy_filter", "only OpenAIPrivacyFilterForTokenClassification"),
    ("step3p5", "checkpoints ship as 'step3p7'"),
    ("mistral_large4_text", "checkpoints ship as 'mistral_large4'"),
])
def test_types_without_a_generator_class_are_refused_in_one_line(model_type, says, tmp_path):
    config = config_class(model_type)()
    with pytest.raises(MoepruneError, match="no causal-LM or image-text-to-text class") as e:
        get_adapter(config)
    assert says in str(e.value) and "\n" not in str(e.value)
    config.save_pretrained(tmp_path / "m")  # a checkpoint's config is enough to be told, before any weights
    with pytest.raises(MoepruneError, match=says):
        api.inspect(tmp_path / "m")


@pytest.mark.slow
def test_dsa_perplexity_through_the_layer_walk_equals_the_model(checkpoint, calib_file):
    """Hy4's third layer reuses the second's top-k token indices: the walk hands them on, up to the head."""
    from moeprune.evaluate.perplexity import perplexity
    from moeprune.pipeline.run import perplexities
    from moeprune.pipeline.sources import CheckpointSource
    from moeprune.store.checkpoint import load_tokenizer

    path = checkpoint("hy_v4")
    model, tok = load_model(path), load_tokenizer(path)
    assert model.config.indexer_types[-1] == "shared"
    whole = perplexity(model, tok, calib_file, seq_len=32, max_tokens=256, batch_size=4)
    (walked,), _ = perplexities(CheckpointSource(path), tok, [calib_file], seq_len=32, max_tokens=256)
    assert walked["windows"] == whole["windows"] == 8
    assert walked["nll"] == pytest.approx(whole["nll"], rel=1e-6)
