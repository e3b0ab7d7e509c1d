"""UNCURL, M-SMoE and NAEE: permutation alignment, aligned merging, subset search, sweep, task calibration."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import COUNT_FIELD, token_ids
from helpers import observed as _observed

from moeprune import api
from moeprune.arch import ExpertWeights, get_adapter
from moeprune.arch.tiny import TINY_FAMILIES, tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods.alignment import align_members, match_hidden
from moeprune.methods.uncurl import fix_up_labels
from moeprune.observe import model_description
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.surgery import apply_layer_plan, apply_plan
from moeprune.surgery.alignment import permute_expert_hidden

# fused [E, 2I, H], transposed [E, H, 2I] (Llama 4), transposed and interleaved gate/up with biases (GPT-OSS)
LAYOUTS = pytest.mark.parametrize("family", ["mixtral", "llama4_text", "gpt_oss"])


def _first_block(model):
    adapter = get_adapter(model.config)
    layer, block = next(iter(adapter.moe_blocks(model).items()))
    return adapter, layer, block


def _params(adapter, block) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.expert_parameters(block).items()}


@torch.no_grad()
def _load(adapter, block, params) -> None:
    for name, value in params.items():
        getattr(adapter.experts(block), name).copy_(value)


def _random_perm(I: int, seed: int = 3) -> torch.Tensor:
    return torch.randperm(I, generator=torch.Generator().manual_seed(seed))


def _snapshot(w: ExpertWeights) -> ExpertWeights:
    """A detached copy of one expert's weight views."""
    return ExpertWeights(*(None if t is None else t.detach().clone() for t in
                           (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)))


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(
        (a.gate, a.up, a.down, a.gate_bias, a.up_bias), (b.gate, b.up, b.down, b.gate_bias, b.up_bias))
        if x is not None)


# ---- alignment ---------------------------------------------------------------------------------

@LAYOUTS
def test_alignment_recovers_a_known_permutation_exactly(family):
    model = tiny_model(family)
    adapter, _, block = _first_block(model)
    params = _params(adapter, block)
    I = adapter.expert_weights(block, 0).gate.shape[0]
    p = _random_perm(I)
    for name in params:  # expert 1 := expert 0 with its hidden units shuffled by p
        params[name][1] = params[name][0]
    permute_expert_hidden(adapter, params, 1, p)
    _load(adapter, block, params)
    ref, shuffled = adapter.expert_weights(block, 0), adapter.expert_weights(block, 1)
    assert not torch.equal(ref.gate, shuffled.gate)
    q = match_hidden(ref, shuffled)
    inverse = torch.empty_like(p)
    inverse[p] = torch.arange(I)
    assert q == inverse.tolist()
    permute_expert_hidden(adapter, params, 1, q)
    _load(adapter, block, params)
    assert _same_weights(adapter.expert_weights(block, 0), adapter.expert_weights(block, 1))


@LAYOUTS
def test_permuting_hidden_units_leaves_the_expert_function_unchanged(family):
    model = tiny_model(family)
    adapter, _, block = _first_block(model)
    x = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.full((16,), 2)
    before = adapter.expert_outputs(block, x, ids)
    w_before = _snapshot(adapter.expert_weights(block, 2))
    params = _params(adapter, block)
    permute_expert_hidden(adapter, params, 2, _random_perm(adapter.expert_weights(block, 2).gate.shape[0]))
    _load(adapter, block, params)
    assert not torch.equal(w_before.gate, adapter.expert_weights(block, 2).gate)
    # only the order of the hidden units changed: equal up to the order of float summation
    torch.testing.assert_close(adapter.expert_outputs(block, x, ids), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_plan_permutations_leave_every_expert_and_the_block_unchanged(family):
    """A plan of singleton groups, each with a random hidden-unit permutation, changes nothing.

    Exercises `permute_members` through surgery (the merge-matrix path, since the groups carry
    perms) on every family's layout: fused [E, 2I, H] (Qwen2-MoE, Mixtral, ...), transposed
    (Llama 4), transposed and interleaved with biases (GPT-OSS).
    """
    model = tiny_model(family)
    adapter, layer, block = _first_block(model)
    E, I = adapter.num_experts, adapter.expert_weights(block, 0).gate.shape[0]
    groups = [Group([e], [1.0], [_random_perm(I, seed=10 + e).tolist()]) for e in range(E)]
    lp = LayerPlan(layer=layer, num_experts_in=E, groups=groups)
    assert not lp.is_pruning  # the permuting path, not the index-select one
    access = ModelWeights(model).layer(layer)
    x = torch.randn(32, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    permuted = copy.deepcopy(block)
    apply_layer_plan(adapter, permuted, lp)
    assert not torch.equal(adapter.expert_weights(permuted, 0).gate, adapter.expert_weights(block, 0).gate)
    for e in range(E):
        ids = torch.full((x.shape[0],), e)
        torch.testing.assert_close(adapter.expert_outputs(permuted, x, ids),
                                   adapter.expert_outputs(block, x, ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(access.block_output(x, lp), access.block_output(x), rtol=1e-5, atol=1e-6)


@LAYOUTS
def test_aligned_merge_of_an_expert_with_its_permuted_copy_gives_back_the_original(family):
    model = tiny_model(family)
    adapter, layer, block = _first_block(model)
    E = adapter.num_experts
    params = _params(adapter, block)
    for name in params:
        params[name][1] = params[name][0]
    permute_expert_hidden(adapter, params, 1, _random_perm(adapter.expert_weights(block, 0).gate.shape[0]))
    _load(adapter, block, params)
    original = _snapshot(adapter.expert_weights(block, 0))
    access = ModelWeights(model).layer(layer)
    perms = align_members(access, [0, 1], reference=0)
    assert perms[0] == list(range(len(perms[0])))  # the reference is not moved
    groups = [Group([0, 1], [0.5, 0.5], perms)] + [Group([e], [1.0]) for e in range(2, E)]
    lp = LayerPlan(layer=layer, num_experts_in=E, groups=groups)
    merged_block = copy.deepcopy(block)
    apply_layer_plan(adapter, merged_block, lp)
    merged = adapter.expert_weights(merged_block, 0)
    for a, b in zip((merged.gate, merged.up, merged.down, merged.gate_bias, merged.up_bias, merged.down_bias),
                    (original.gate, original.up, original.down, original.gate_bias, original.up_bias,
                     original.down_bias)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # without the alignment the average of the two is a different expert
    unaligned = copy.deepcopy(block)
    apply_layer_plan(adapter, unaligned, LayerPlan(layer, E, [Group([0, 1], [0.5, 0.5])] + groups[1:]))
    assert (adapter.expert_weights(unaligned, 0).gate - original.gate).abs().max() > 1e-3


def test_plan_with_perms_round_trips_through_json_and_validate_rejects_bad_perms(tmp_path):
    model = tiny_model("mixtral")
    desc = model_description(model, get_adapter(model.config))
    I = 128
    perm = _random_perm(I).tolist()
    layers = [LayerPlan(layer=i, num_experts_in=8,
                        groups=[Group([0, 1], [0.25, 0.75], [list(range(I)), perm])]
                        + [Group([e], [1.0]) for e in range(2, 8)]) for i in desc["moe_layers"]]
    plan = Plan(method="uncurl", layers=layers, model=desc)
    plan.validate()
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back.layers[0].groups[0].perms == [list(range(I)), perm]
    assert back.layers[0].groups[1].perms is None
    assert "perms" not in json.loads((tmp_path / "plan.json").read_text())["layers"][0]["groups"][1]
    assert not back.layers[0].is_pruning
    bad = copy.deepcopy(back)
    bad.layers[0].groups[0].perms[1] = [0] * I
    with pytest.raises(MoepruneError, match="not a permutation"):
        bad.validate()
    bad.layers[0].groups[0].perms = [list(range(I))]
    with pytest.raises(MoepruneError, match="one per member"):
        bad.validate()
    bad.layers[0].groups[0].perms = [list(range(I)), list(range(I - 1))]
    with pytest.raises(MoepruneError, match="different lengths"):
        bad.validate()
    short = copy.deepcopy(back)
    for lp in short.layers:
        lp.groups[0].perms = [list(range(4)), [1, 0, 3, 2]]
    with pytest.raises(MoepruneError, match="hidden units"):  # surgery checks I against the model
        apply_plan(copy.deepcopy(model), short)


# ---- the methods on real (tiny) models -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["uncurl", "msmoe"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_merged_checkpoints_reload_with_stock_transformers(method, family, checkpoint, calib_file, tmp_path):
    src = checkpoint(family)
    out = api.prune(src, method, tmp_path / "out", experts=4, calib=str(calib_file), samples=4, seq_len=32,
                    progress=False)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.num_experts_out == 4
    merged = [g for lp in plan.layers for g in lp.groups if len(g.members) > 1]
    assert merged and all(g.perms is not None and len(g.perms) == len(g.members) for g in merged)
    for lp in plan.layers:
        for g in lp.groups:
            assert abs(sum(g.coeffs) - 1) < 1e-9
            if g.perms is not None:  # the reference is the most used member, not permuted
                ref = lp.notes["references"][lp.groups.index(g)]
                assert g.perms[g.members.index(ref)] == list(range(len(g.perms[0])))
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert getattr(reloaded.config, COUNT_FIELD[family]) == 4
    in_memory = apply_plan(tf.AutoModelForCausalLM.from_pretrained(str(src)).eval(), plan)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-5)


def test_msmoe_keeps_the_most_used_experts_as_dominants():
    model = tiny_model("mixtral")
    stats = _observed(model)
    plan = api.make_plan_for(stats, "msmoe", experts=3, weights=ModelWeights(model))
    for lp in plan.layers:
        counts = stats.layers[lp.layer].experts.count
        top = sorted(sorted(range(8), key=lambda e: (-float(counts[e]), e))[:3])
        assert sorted(lp.notes["references"]) == top
        assert sorted(e for g in lp.groups for e in g.members) == list(range(8))


@pytest.mark.parametrize("method", ["uncurl", "msmoe", "naee"])
def test_group_limited_routing_keeps_every_output_expert_inside_one_routing_group(method):
    model = tiny_model("deepseek_v3")  # n_group = 2: experts 0-3 and 4-7
    stats = _observed(model)
    plan = api.make_plan_for(stats, method, experts=4, weights=ModelWeights(model))
    for lp in plan.layers:
        assert [{m // 4 for m in g.members} for g in lp.groups] == [{0}, {0}, {1}, {1}]
    apply_plan(copy.deepcopy(model), plan)


def test_uncurl_kmeans_and_label_fix_up_are_deterministic():
    model = tiny_model("qwen3_moe")
    stats = _observed(model)
    weights = ModelWeights(model)
    a = api.make_plan_for(stats, "uncurl", experts=3, weights=weights, options={"clustering": "kmeans"})
    b = api.make_plan_for(stats, "uncurl", experts=3, weights=weights, options={"clustering": "kmeans"})
    assert a.to_dict() == b.to_dict() and a.layers[0].notes["clustering"] == "kmeans"
    affinity = torch.tensor([[1, .9, .2, .5], [.9, 1, .3, .5], [.2, .3, 1, .5], [.5, .5, .5, 1]],
                            dtype=torch.float64)
    # spectral clustering may return fewer labels than asked: the worst-fitting member splits off
    assert fix_up_labels([0, 0, 0, 1], 3, affinity) == ([0, 0, 1, 2], 1)
    with pytest.raises(MoepruneError, match="clustering"):
        api.make_plan_for(stats, "uncurl", experts=3, weights=weights, options={"clustering": "dbscan"})


def _low_rank_logits(seed: int, m: int = 32, n: int = 256, rank: int = 6):
    """[m, n] router-logit columns of rank `rank` with four planted near-duplicate experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64)  # the probe's hidden states, low rank
    w = torch.randn(m, rank, generator=g, dtype=torch.float64)  # router rows
    pairs = [[3, 17], [8, 25], [12, 30], [20, 21]]
    for a, b in pairs:
        w[b] = w[a] + 0.01 * torch.randn(rank, generator=g, dtype=torch.float64)
    return (x @ w.T).T.contiguous(), pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_clustering_merges_near_duplicate_logits_when_few_experts_go(seed):
    """32 experts into 28 on low-rank router logits: the four merges are the four near-duplicates.

    Router logits are X W_r^T, so their cosine Gram matrix has a near-null space. The plain
    28-eigenvector spectral embedding (scikit-learn's default, n_components = n_clusters) then tells
    experts apart by its 4 discarded, least informative eigenvectors and merged experts with cosine
    around 0 (qwen-fine at 12.5%: +20% perplexity); the eigenvalue-weighted embedding does not.
    """
    from moeprune.methods.uncurl import cluster_logits, cosine_matrix

    z, pairs = _low_rank_logits(seed)
    assert min(float(cosine_matrix(z)[a, b]) for a, b in pairs) > 0.999
    labels, created = cluster_logits(z, 28, "spectral", seed)
    merged = sorted(sorted(e for e in range(32) if labels[e] == c) for c in set(labels))
    assert [c for c in merged if len(c) > 1] == pairs and created == 0


def test_spectral_plain_is_scikit_learns_reading():
    """`clustering=spectral-plain` keeps scikit-learn's unweighted spectral clustering as an option."""
    from sklearn.cluster import SpectralClustering

    from moeprune.methods.uncurl import cluster_logits, cosine_matrix

    z = torch.randn(12, 40, generator=torch.Generator().manual_seed(1)).double()
    labels, _ = cluster_logits(z, 4, "spectral-plain", seed=3)
    affinity = ((cosine_matrix(z) + 1) / 2).numpy()
    want = SpectralClustering(n_clusters=4, affinity="precomputed", random_state=3,
                              assign_labels="kmeans").fit_predict(affinity)
    same = {(a, b) for a, b in zip(labels, want)}  # the same partition, whatever the label numbers
    assert len(same) == len(set(labels)) == len(set(want))
