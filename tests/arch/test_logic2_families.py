"""Families whose pruning needs logic of its own (arch/families.py, [logic2]): LongCat-Flash's zero-compute
experts, DeepSeek-V4's hash-routed layers, Inkling's shared-expert router rows, Muse Spark's projected
experts; and the refusals (muse_spark_text, MoNE novices).

Each is built in the shape the every-family battery cannot take (zero experts, hash layers, a projected
width unlike the hidden one) and goes through the same path: surgery in memory, a checkpoint written
layer by layer, reloaded with its own Auto class.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from helpers import manual_plan, token_ids

from moeprune import api, compat
from moeprune.arch import get_adapter
from moeprune.arch.families import hash_table_remap
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.errors import MoepruneError
from moeprune.observe import observe
from moeprune.observe.stats import Stats
from moeprune.plan import Group, LayerPlan
from moeprune.surgery import apply_layer_plan, apply_plan

KEEP = [0, 1, 4, 5]
MERGE = [([0, 2], [0.5, 0.5]), ([1], [1.0]), ([4, 6, 7], [0.2, 0.3, 0.5]), ([5], [1.0])]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _through_checkpoint(model_type, tmp_path, plan_of, **overrides):
    """(original, in-memory result, reloaded checkpoint result) for the plan `plan_of(model)`."""
    original = save_tiny_checkpoint(model_type, tmp_path / "src", **overrides)
    plan = plan_of(original)
    out = api.apply_checkpoint(tmp_path / "src", plan, tmp_path / "out", layerwise=True, progress=False)
    auto_name, cls = compat.model_class(tf.AutoConfig.from_pretrained(out))
    assert cls is type(original)
    reloaded, info = getattr(tf, auto_name).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
    in_memory = apply_plan(copy.deepcopy(original), plan)
    mem = in_memory.state_dict()
    for name, tensor in reloaded.eval().state_dict().items():
        assert torch.equal(tensor, mem[name]), name
    return original, in_memory, reloaded


# ---- LongCat-Flash: zero-compute experts ----------------------------------------------------------
@pytest.mark.slow
def test_longcat_zero_experts_are_never_pruned_but_stay_routed(tmp_path):
    Z = 2
    original, pruned, reloaded = _through_checkpoint(
        "longcat_flash", tmp_path, lambda m: manual_plan(m, keep=KEEP), zero_expert_num=Z)
    cfg = reloaded.config
    assert (cfg.n_routed_experts, cfg.zero_expert_num) == (len(KEEP), Z)
    rows = KEEP + [8, 9]  # the kept real experts, then the two zero experts, renumbered 4 and 5
    for i, layer in enumerate(reloaded.model.layers):
        before, after = original.model.layers[i].mlp, layer.mlp
        assert torch.equal(after.router.classifier.weight, before.router.classifier.weight[rows])
        assert torch.equal(after.router.e_score_correction_bias, before.router.e_score_correction_bias[rows])
        assert torch.equal(after.experts.gate_up_proj, before.experts.gate_up_proj[rows])  # [E+Z, 2I, H]
        assert torch.equal(after.experts.down_proj, before.experts.down_proj[KEEP])  # [E, H, I]
        assert (after.experts.num_routed_experts, after.experts.total_experts) == (4, 6)
        assert after.router.n_routed_experts == 6
    # a token sent to a zero expert still gets its input back (identity), at the renumbered id
    block = reloaded.model.layers[0].mlp
    x = torch.randn(5, cfg.hidden_size)
    ids = torch.tensor([[4, 5]] * 5)  # both zero experts
    w = torch.full((5, 2), 0.5)
    torch.testing.assert_close(block.experts(x, ids, w), x, rtol=0, atol=1e-6)
    ids = token_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_longcat_observation_counts_only_real_experts(tmp_path):
    model = tiny_model("longcat_flash", zero_expert_num=2)
    adapter = get_adapter(model.config)
    ids = token_ids(n=2, length=32)
    routed = {}

    def grab(i):
        def hook(module, args, output):
            routed[i] = output[2]  # [T, K] ids, zero experts included
        return hook

    handles = [b.router.register_forward_hook(grab(i)) for i, b in adapter.moe_blocks(model).items()]
    before = _logits(model, ids)
    stats = observe(model, ids, batch_size=2)
    for h in handles:
        h.remove()
    assert torch.equal(before, _logits(model, ids))  # observing hooks removed, model unchanged
    for i, ls in stats.layers.items():
        real = int((routed[i] < 8).sum())
        assert ls.experts.count.shape == (8,) and int(ls.experts.count.sum()) == real
    assert any(int((r >= 8).sum()) for r in routed.values()), "no pair went to a zero expert"
    assert all(ls.probe.router_logits.shape[1] == 8 for ls in stats.layers.values())  # real experts' logits
    stats.save(tmp_path / "stats")
    loaded = Stats.load(tmp_path / "stats")
    assert torch.equal(loaded.layers[0].experts.count, stats.layers[0].experts.count)


@pytest.mark.slow
def test_longcat_merge_keeps_zero_rows():
    model = tiny_model("longcat_flash", zero_expert_num=2)
    before = model.model.layers[1].mlp
    merged = apply_plan(copy.deepcopy(model), manual_plan(model, groups=MERGE))
    after = merged.model.layers[1].mlp
    assert torch.equal(after.router.classifier.weight[4:], before.router.classifier.weight[8:])
    assert torch.equal(after.experts.gate_up_proj[4:], before.experts.gate_up_proj[8:])
    down = before.experts.down_proj
    expect = 0.2 * down[4] + 0.3 * down[6] + 0.5 * down[7]
    torch.testing.assert_close(after.experts.down_proj[2], expect)


# ---- Inkling: shared experts' router rows ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["inkling_text", "inkling_mm_model"])
def test_inkling_keeps_the_shared_router_rows(model_type, tmp_path):
    original, _, reloaded = _through_checkpoint(model_type, tmp_path, lambda m: manual_plan(m, groups=MERGE))
    adapter = get_adapter(original.config)
    S = adapter.config.n_shared_experts
    blocks_before = adapter.moe_blocks(original)
    blocks_after = get_adapter(reloaded.config).moe_blocks(reloaded)
    for i, before in blocks_before.items():
        after = blocks_after[i]
        assert after.gate.weight.shape == (4 + S, adapter.config.hidden_size)
        assert torch.equal(after.gate.weight[4:], before.gate.weight[8:])  # shared rows, bit-identical
        w = before.gate.weight
        torch.testing.assert_close(after.gate.weight[0], 0.5 * w[0] + 0.5 * w[2])
        assert after.gate.e_score_correction_bias.shape == (4,)
        assert after.gate.n_total_experts == 4 + S
        for name, p in after.shared_experts.named_parameters():
            assert torch.equal(p, dict(before.shared_experts.named_parameters())[name])


# ---- DeepSeek-V4: hash-routed layers --------------------------------------------------------------
HASH = dict(mlp_layer_types=["hash_moe", "hash_moe", "moe"])


def _random_tables(model, seed=0):
    """Fill every hash layer's tid2eid [V, K] with K distinct random experts per token."""
    g = torch.Generator().manual_seed(seed)
    for block in get_adapter(model.config).moe_blocks(model).values():
        if block.is_hash:
            V, K = block.gate.tid2eid.shape
            block.gate.tid2eid.copy_(torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(V)]))


def test_hash_table_rule_on_pruning():
    torch.manual_seed(0)
    W = torch.randn(8, 16)  # old router rows
    table = torch.tensor([[0, 1], [2, 4], [3, 6], [0, 7], [6, 7]])
    M = torch.zeros(4, 8, dtype=torch.float64)
    for j, e in enumerate(KEEP):
        M[j, e] = 1.0
    new = hash_table_remap(table, M, W)
    assert new[0].tolist() == [0, 1] and new[1, 1] == 2  # kept experts: their new index
    cos = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(W[KEEP], dim=1).T
    assert new[1, 0] == [j for j in cos[2].argsort(descending=True).tolist() if j != 2][0]
    assert new[4, 0] == cos[6].argmax() and new[4, 1] != new[4, 0]  # both pruned: distinct picks
    assert (new[:, 0] != new[:, 1]).all() and new.max() < 4


def test_hash_table_rule_on_merging():
    W = torch.randn(8, 16)
    M = torch.zeros(4, 8, dtype=torch.float64)
    for j, (members, coeffs) in enumerate(MERGE):
        M[j, members] = torch.tensor(coeffs, dtype=torch.float64)
    table = torch.tensor([[0, 2], [6, 5], [3, 1]])
    new = hash_table_remap(table, M, W)
    assert new[0].tolist() == [0, 0]  # both merged into group 0: the group carries the whole gate
    assert new[1].tolist() == [2, 3]
    assert new[2, 1] == 1 and new[2, 0] != 1  # 3 is in no group: pruned, goes to a distinct survivor


@pytest.mark.slow
def test_deepseek_v4_hash_layers_prune_through_a_checkpoint(tmp_path):
    model = tiny_model("deepseek_v4", **HASH)
    _random_tables(model)
    src = tmp_path / "src"
    model.save_pretrained(src)
    plan = manual_plan(model, keep=KEEP)
    out = api.apply_checkpoint(src, plan, tmp_path / "out", layerwise=True, progress=False)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    in_memory = apply_plan(copy.deepcopy(model), plan)
    mem = in_memory.state_dict()
    for name, tensor in reloaded.eval().state_dict().items():
        assert torch.equal(tensor, mem[name]), name
    new_of = {e: j for j, e in enumerate(KEEP)}
    for i in (0, 1):
        old, new = model.model.layers[i].mlp.gate.tid2eid, reloaded.model.layers[i].mlp.gate.tid2eid
        assert new.max() < 4 and (new[:, 0] != new[:, 1]).all()
        both = torch.isin(old, torch.tensor(KEEP)).all(dim=1)
        assert both.any()
        assert torch.equal(new[both], old[both].apply_(lambda e: new_of[e]))
    ids = token_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(in_memory, ids), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_deepseek_v4_hash_routes_of_surviving_tokens_are_exact():
    model = tiny_model("deepseek_v4", **HASH)
    _random_tables(model)
    block = model.model.layers[0].mlp
    adapter = get_adapter(model.config)
    assert adapter.survivors_exact()[0]
    ids = torch.arange(256)[None]  # every token id once
    x = torch.randn(1, 256, adapter.config.hidden_size)
    with torch.no_grad():
        before = block(x, input_ids=ids)
        pruned = copy.deepcopy(block)
        apply_layer_plan(adapter, pruned, LayerPlan(0, 8, [Group([e], [1.0]) for e in KEEP]))
        after = pruned(x, input_ids=ids)
    survived = torch.isin(block.gate.tid2eid[ids[0]], torch.tensor(KEEP)).all(dim=1)
    assert survived.sum() >= 4
    assert (after[0, survived] - before[0, survived]).abs().max() <= 1e-5
    assert (after[0, ~survived] - before[0, ~survived]).abs().max() > 1e-5  # the others did change


# ---- Muse Spark: experts in a projected space -----------------------------------------------------
PROJECTED = dict(text_config=dict(moe_hidden_size=32, eos_token_id=1, bos_token_id=0))


@pytest.mark.slow
def test_muse_spark_expert_outputs_live_in_the_blocks_space():
    model = tiny_model("muse_spark", **PROJECTED)
    adapter = get_adapter(model.config)
    block = adapter.moe_blocks(model)[1]
    H = adapter.config.hidden_size
    x = torch.randn(6, H)
    with torch.no_grad():
        _, w, idx = block.gate(x)
        F = torch.stack([adapter.expert_outputs(block, x, idx[:, k]) for k in range(2)], 1)  # [T, K, H]
        assert F.shape == (6, 2, H)
        torch.testing.assert_close((F * w[..., None]).sum(1), block(x[None])[0], rtol=1e-5, atol=1e-6)
    stats = observe(model, token_ids(n=2, length=16), batch_size=2)
    ls = stats.layers[1]
    assert ls.experts.mean.shape == (8, H) and int(ls.experts.count.sum()) == 2 * 16 * 2


@pytest.mark.slow
def test_muse_spark_prunes_through_a_checkpoint(tmp_path):
    original, in_memory, reloaded = _through_checkpoint(
        "muse_spark", tmp_path, lambda m: manual_plan(m, keep=KEEP), **PROJECTED)
    text = reloaded.config.text_config
    assert (text.num_local_experts, text.moe_hidden_size) == (4, 32)
    ids = token_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(in_memory, ids), rtol=0, atol=1e-6)


# ---- refusals -------------------------------------------------------------------------------------
def test_muse_spark_text_alone_is_refused_in_one_line():
    with pytest.raises(MoepruneError, match="no class with a language-model head") as e:
        get_adapter(tf.MuseSparkTextConfig())
    assert "\n" not in str(e.value) and "'muse_spark_text'" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("model_type,overrides", [
    ("longcat_flash", dict(zero_expert_num=2)), ("deepseek_v4", HASH), ("inkling_text", {}),
    ("muse_spark", PROJECTED)])
@pytest.mark.slow
def test_novices_are_refused_before_any_work(model_type, overrides, tmp_path):
    save_tiny_checkpoint(model_type, tmp_path / "m", **overrides)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 200)
    with pytest.raises(MoepruneError, match="novice") as e:
        api.prune(tmp_path / "m", "mone", tmp_path / "out", experts=4, calib=str(calib), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    model = tiny_model(model_type, **overrides)
    adapter = get_adapter(model.config)
    i, block = next(iter(adapter.moe_blocks(model).items()))
    lp = LayerPlan(i, 8, [Group([e], [1.0]) for e in KEEP], novices=[2, 3, 6, 7])
    with pytest.raises(MoepruneError, match="novice"):
        apply_layer_plan(adapter, block, lp, torch.zeros(4, adapter.config.hidden_size))


def test_deepseek_v4_without_hash_layers_takes_novices():
    assert get_adapter(tf.DeepseekV4Config(mlp_layer_types=["moe"] * 43)).novice_refusal is None
    assert "tid2eid" in get_adapter(tf.DeepseekV4Config()).novice_refusal  # 3 hash layers by default


@pytest.mark.slow
def test_methods_that_rerun_a_hash_block_alone_are_refused_in_one_line():
    from moeprune.pipeline.access import LayerAccess

    model = tiny_model("deepseek_v4", **HASH)
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    x = torch.randn(4, adapter.config.hidden_size)
    hashed = LayerAccess(adapter, blocks[0], 0)
    for call in (lambda: hashed.block_output(x), lambda: hashed.routed_lookup(x),
                 lambda: hashed.merged_block(4)):
        with pytest.raises(MoepruneError, match="layer 0: a DeepSeek-V4 hash-routed block") as e:
            call()
        assert "\n" not in str(e.value)
    assert LayerAccess(adapter, blocks[2], 2).block_output(x).shape == x.shape  # learned routing runs


@pytest.mark.slow
@pytest.mark.parametrize("method,options,says", [
    ("naee", None, "naee: a DeepSeek-V4 hash-routed block"),
    ("dek", {"coefficients": "learned"}, "dek coefficients=learned: a DeepSeek-V4 hash-routed block")])
def test_methods_that_rerun_a_hash_block_are_refused_before_calibration(method, options, says, tmp_path):
    save_tiny_checkpoint("deepseek_v4", tmp_path / "m", **HASH)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 200)
    # the up-front check's line (method first), not the walk's per-layer one ("layer 0: ...")
    with pytest.raises(MoepruneError, match=f"^{says}") as e:
        api.prune(tmp_path / "m", method, tmp_path / "out", experts=4, calib=str(calib), progress=False,
                  options=options)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    # without hash layers the same method is not refused up front
    get_adapter(tf.DeepseekV4Config(mlp_layer_types=["moe"] * 43)).check_method(method, None)


@pytest.mark.slow
def test_longcat_routed_lookup_and_merged_block_see_the_zero_experts():
    """NAEE's lookup and the merge fit's differentiable copy carry the zero experts like surgery does."""
    from moeprune.pipeline.access import LayerAccess
    from moeprune.surgery import merge_matrix

    model = tiny_model("longcat_flash", zero_expert_num=2)
    adapter = get_adapter(model.config)
    access = LayerAccess(adapter, adapter.moe_blocks(model)[1], 1)
    x = torch.randn(32, adapter.config.hidden_size)
    lp = LayerPlan(1, 8, [Group([e], [1.0]) for e in KEEP])
    pruned = access.block_output(x, lp)
    torch.testing.assert_close(access.routed_lookup(x)(KEEP), pruned, rtol=1e-5, atol=1e-6)
    lp = LayerPlan(1, 8, [Group(m, c) for m, c in MERGE])
    merged = access.merged_block(4)
    merged.set(merge_matrix(lp).float())
    torch.testing.assert_close(merged(x), access.block_output(x, lp), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inkling_merged_block_keeps_the_shared_router_rows():
    from moeprune.pipeline.access import LayerAccess
    from moeprune.surgery import merge_matrix

    model = tiny_model("inkling_text")
    adapter = get_adapter(model.config)
    access = LayerAccess(adapter, adapter.moe_blocks(model)[1], 1)
    x = torch.randn(32, adapter.config.hidden_size)
    lp = LayerPlan(1, 8, [Group(m, c) for m, c in MERGE])
    merged = access.merged_block(4)
    merged.set(merge_matrix(lp).float())
    torch.testing.assert_close(merged(x), access.block_output(x, lp), rtol=1e-5, atol=1e-6)
