"""Families that needed logic of their own: DBRX (flat experts, nested count), ZAYA (a skip class after
the experts), and the two refused in one line: JetMoE (MLP and attention experts share one count) and
Doge (product-key experts)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import manual_plan, saved_tensors, token_ids

from moeprune import api
from moeprune.arch import SUPPORTED_MODEL_TYPES, get_adapter
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.errors import MoepruneError
from moeprune.observe import observe
from moeprune.surgery import apply_plan

KEEP = [0, 1, 4, 5]


# ---- DBRX ---------------------------------------------------------------------------------------
def test_dbrx_pruned_checkpoint_writes_the_nested_count_and_flat_tensors(tmp_path):
    src = tmp_path / "dbrx"
    original = save_tiny_checkpoint("dbrx", src)
    api.apply_checkpoint(src, manual_plan(original, keep=KEEP), tmp_path / "out", layerwise=True,
                         progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["ffn_config"]["moe_num_experts"] == len(KEEP)
    assert written["ffn_config"]["moe_top_k"] == 2
    assert "moe_num_experts" not in written  # not at the top level, where DBRX does not read it
    before, after = saved_tensors(src), saved_tensors(tmp_path / "out")
    key = "transformer.blocks.1.ffn.experts.mlp.w1"
    I = original.config.ffn_config.ffn_hidden_size
    assert after[key].shape == (len(KEEP) * I, 64)  # still flat [E'*I, H]
    for j, e in enumerate(KEEP):  # expert j of the output is input expert KEEP[j], bit for bit
        for name in ("w1", "v1", "w2"):
            k = f"transformer.blocks.1.ffn.experts.mlp.{name}"
            assert torch.equal(after[k][j * I:(j + 1) * I], before[k][e * I:(e + 1) * I]), (name, e)
    router = "transformer.blocks.1.ffn.router.layer.weight"
    assert torch.equal(after[router], before[router][KEEP])


def test_dbrx_observed_forward_is_the_plain_forward_and_counts_every_route():
    model = tiny_model("dbrx")
    ids = token_ids(n=2, length=16)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
    seen = {}
    hooks = [model.transformer.blocks[i].ffn.register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, o)) for i in range(3)]
    stats = observe(model, ids, batch_size=2, probe_size=8)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        again = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(plain, again)  # the observer leaves nothing behind
    for layer in stats.layers.values():
        assert int(layer.experts.count.sum()) == ids.numel() * 2  # every (token, expert) pair, top-2
    assert all(o.shape == (2, 16, 64) for o in seen.values())  # the block's [B, L, H] shape kept


def test_dbrx_merging_keeps_the_flat_layout_and_merges_the_view():
    model = tiny_model("dbrx")
    plan = manual_plan(model, groups=[([0, 1], [0.5, 0.5]), ([2], [1.0]), ([3, 4, 5], [0.2, 0.3, 0.5]),
                                      ([6, 7], [0.5, 0.5])])
    ref = copy.deepcopy(model)
    merged = apply_plan(model, plan)
    I = 128
    w = merged.transformer.blocks[0].ffn.experts.mlp.w1  # [4*I, H]
    assert w.shape == (4 * I, 64)
    old = ref.transformer.blocks[0].ffn.experts.mlp.w1.view(8, I, 64).double()
    torch.testing.assert_close(w.view(4, I, 64)[2].double(), 0.2 * old[3] + 0.3 * old[4] + 0.5 * old[5])
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=token_ids(), use_cache=False).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [True, False])
def test_dbrx_prunes_with_a_calibrated_method(tmp_path, layerwise):
    src = tmp_path / "dbrx"
    save_tiny_checkpoint("dbrx", src)
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 300)
    out = api.prune(src, "reap", tmp_path / "out", experts=4, calib=str(calib), samples=4, seq_len=32,
                    progress=False, layerwise=layerwise)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.ffn_config.moe_num_experts == 4
    assert reloaded.transformer.blocks[0].ffn.experts.mlp.w2.shape == (4 * 128, 64)
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=token_ids(), use_cache=False).logits).all()


# ---- ZAYA ---------------------------------------------------------------------------------------
def _zaya_with_biases():
    """A tiny ZAYA whose balancing biases differ per class, so that slicing them is checked."""
    model = tiny_model("zaya")
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.balancing_biases.copy_(torch.rand(9) * 0.01)
            layer.mlp.gate.balancing_biases[-1] = -1.0
    return model


def test_zaya_pruning_keeps_the_skip_class_after_the_kept_experts(tmp_path):
    model = _zaya_with_biases()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    model.save_pretrained(tmp_path / "zaya")
    out = api.apply_checkpoint(tmp_path / "zaya", manual_plan(model, keep=KEEP), tmp_path / "out",
                               progress=False)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == len(KEEP)
    rows = KEEP + [8]  # the kept experts' rows, then the skip class's
    for i, layer in enumerate(reloaded.model.layers):
        gate = layer.mlp.gate
        prefix = f"model.layers.{i}.mlp.gate."
        assert torch.equal(gate.balancing_biases, before[prefix + "balancing_biases"][rows])
        w = prefix + "router_mlp.out_proj.weight"
        assert torch.equal(gate.router_mlp.out_proj.weight, before[w][rows])
        assert gate.num_router_classes == len(KEEP) + 1


def test_zaya_tokens_sent_to_the_skip_class_still_skip_after_pruning():
    model = _zaya_with_biases()
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.gate.balancing_biases[-1] = 2.0  # every token picks the skip class
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.count_nonzero(block(x)[0]) == 0
        pruned = apply_plan(copy.deepcopy(model), manual_plan(model, keep=KEEP))
        assert torch.count_nonzero(pruned.model.layers[1].mlp(x)[0]) == 0
        pruned.model.layers[1].mlp.gate.balancing_biases[-1] = -1.0  # and routed tokens do reach experts
        assert torch.count_nonzero(pruned.model.layers[1].mlp(x)[0]) > 0


def test_zaya_a_block_pruned_alone_finds_its_own_skip_class():
    """One config serves every layer: a block pruned alone must not look for its skip class at E."""
    model = _zaya_with_biases()
    block = copy.deepcopy(model.model.layers[1].mlp)
    from moeprune.plan import Group, LayerPlan
    from moeprune.surgery import apply_layer_plan

    adapter = get_adapter(model.config)
    apply_layer_plan(adapter, block, LayerPlan(1, 8, [Group([e], [1.0]) for e in KEEP]))
    assert model.config.num_experts == 8 and block.gate.config.num_experts == len(KEEP)
    with torch.no_grad():
        block.gate.balancing_biases[-1] = 2.0
        assert torch.count_nonzero(block(torch.randn(2, 8, 64))[0]) == 0


def test_zaya_observer_counts_skip_picks_for_no_expert():
    model = _zaya_with_biases()
    with torch.no_grad():
        model.model.layers[2].mlp.gate.balancing_biases[-1] = 2.0  # layer 2 skips every token
    ids = token_ids(n=2, length=16)
    stats = observe(model, ids, batch_size=2, probe_size=8)
    assert int(stats.layers[2].experts.count.sum()) == 0  # not 32 picks of expert 0
    assert int(stats.layers[0].experts.count.sum()) == ids.numel()  # top-1, none skipped
    assert stats.layers[0].probe.router_logits.shape[-1] == 8  # the experts' logits, not the skip class's


def test_zaya_layer_walk_carries_router_states_and_matches_the_whole_forward():
    """Calibration runs the layers one at a time; each ZAYA layer needs the previous one's router states."""
    from moeprune import pipeline
    from moeprune.pipeline.sources import ModelSource
    from moeprune.settings import CalibrationRequest, RuntimeRequest

    model = _zaya_with_biases()
    ids = token_ids(n=4, length=16)
    whole = observe(model, ids, batch_size=2, probe_size=8)
    walked = pipeline.observe(ModelSource(model), ids, calib=CalibrationRequest(probe_size=8),
                              runtime=RuntimeRequest(batch_size=2))
    for i in (1, 2):  # layer 0 gets no router states, the others must get the previous layer's
        a, b = whole.layers[i].experts, walked.layers[i].experts
        assert torch.equal(a.count, b.count), i
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    # the walk's last hidden states through the model's own head (perplexity does this) give its logits
    from moeprune.pipeline.activations import head_logits

    last = pipeline.forward(ModelSource(model), ids, runtime=RuntimeRequest(batch_size=2))  # [N, L, H]
    with torch.no_grad():
        logits = head_logits(model, model.model.layers, ids, last)
        torch.testing.assert_close(logits, model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [True, False])
def test_zaya_prunes_with_a_calibrated_method(tmp_path, layerwise):
    save_tiny_checkpoint("zaya", tmp_path / "zaya")
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 300)
    out = api.prune(tmp_path / "zaya", "reap", tmp_path / "out", experts=4, calib=str(calib), samples=4,
                    seq_len=32, progress=False, layerwise=layerwise)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 4
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=token_ids(), use_cache=False).logits).all()


def test_zaya_prunes_with_a_weight_only_method(tmp_path):
    save_tiny_checkpoint("zaya", tmp_path / "zaya")
    out = api.prune(tmp_path / "zaya", "dek", tmp_path / "out", experts=4, progress=False,
                    options={"representation": "weight"})
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 4
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=token_ids(), use_cache=False).logits).all()


# ---- refused in one line ----------------------------------------------------------------------
@pytest.mark.parametrize("config,says", [
    (tf.JetMoeConfig(), "share one count \\(num_local_experts\\)"),
    (tf.DogeConfig(is_moe=True), "product keys"),
    (tf.DogeConfig(), "product keys"),
])
def test_refused_families_say_why_in_one_line(config, says):
    assert config.model_type not in SUPPORTED_MODEL_TYPES
    with pytest.raises(MoepruneError, match=says) as e:
        get_adapter(config)
    assert "\n" not in str(e.value) and repr(config.model_type) in str(e.value)


def test_jetmoe_attention_experts_follow_the_mlp_count():
    """Why JetMoE is refused: its config's one count builds the attention experts too."""
    config = tf.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2,
                             kv_channels=8, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    layer = tf.JetMoeForCausalLM(config).model.layers[0]
    assert layer.mlp.input_linear.weight.shape[0] == 4
    assert layer.self_attention.experts.input_linear.weight.shape[0] == 4


def test_doge_is_refused_before_any_calibration(tmp_path, monkeypatch):
    config = tf.DogeConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, is_moe=True, num_experts=16, num_experts_per_tok=2)
    model = tf.DogeForCausalLM(config)
    model.save_pretrained(tmp_path / "doge")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 200)

    def no_tokenizer(*a, **k):
        raise AssertionError("calibration work started")

    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", no_tokenizer)
    with pytest.raises(MoepruneError, match="product keys") as e:
        api.prune(tmp_path / "doge", "frequency", tmp_path / "out", experts=4, calib=str(calib),
                  progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,options,says", [
    ("mone", None, "DBRX keeps its experts flat"),
    ("uncurl", None, "align=false"),
    ("msmoe", None, "align=false"),
])
def test_dbrx_refuses_alignment_and_novices_before_calibration(tmp_path, method, options, says):
    save_tiny_checkpoint("dbrx", tmp_path / "dbrx")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 200)
    with pytest.raises(MoepruneError, match=says) as e:
        api.prune(tmp_path / "dbrx", method, tmp_path / "out", experts=4, calib=str(calib), progress=False,
                  options=options)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_zaya_novices_keep_the_skip_class_on_disk_and_back(tmp_path):
    """MoNE keeps the router whole: the stock part holds the kept experts' rows and the skip class's; the
    novice file the novices' rows; loading puts all E + 1 back in order."""
    import moeprune
    from moeprune.store.checkpoint import export_stock

    src = tmp_path / "zaya"
    original = save_tiny_checkpoint("zaya", src)
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 300)
    out = api.prune(src, "mone", tmp_path / "out", experts=4, calib=str(calib), samples=4, seq_len=32,
                    progress=False)
    loaded = moeprune.from_pretrained(out)
    for a, b in zip(loaded.model.layers, original.model.layers):
        assert torch.equal(a.mlp.gate.router_mlp.out_proj.weight, b.mlp.gate.router_mlp.out_proj.weight)
        assert torch.equal(a.mlp.gate.balancing_biases, b.mlp.gate.balancing_biases)
    stock = tf.AutoModelForCausalLM.from_pretrained(export_stock(out, tmp_path / "stock"))
    assert stock.config.num_experts == 4
    for a, b in zip(stock.model.layers, original.model.layers):
        skip_a, skip_b = a.mlp.gate.router_mlp.out_proj.weight[-1], b.mlp.gate.router_mlp.out_proj.weight[-1]
        assert torch.equal(skip_a, skip_b)  # the skip class's row, still last
