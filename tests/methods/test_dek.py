"""DEK and HC-SMoE: linear CKA, representations, grouping, coefficients, merged checkpoints, analyze."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf
from helpers import COUNT_FIELD

from moeprune import api
from moeprune.api import empty_stats, make_plan_for
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.methods.cka import (
    DegenerateRepresentationWarning,
    linear_cka,
    pairwise_cka,
    pairwise_vector_cka,
)
from moeprune.methods.dek import weight_similarity
from moeprune.methods.groups import within_routing_groups
from moeprune.methods.hc_smoe import mean_outputs, output_distance
from moeprune.methods.merging import (
    agglomerative_clusters,
    distance_clustering,
    layer_plan,
    merge_matrix_of,
    reconstruction_error,
)
from moeprune.observe import observe
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Plan
from moeprune.surgery import apply_plan


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ids(seed: int = 0, batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def direct_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """HSIC with an explicit centring matrix: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = X.shape[0]
    Hc = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return torch.trace(A @ Hc @ B @ Hc)

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


# ---- linear CKA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(12, 40), (80, 6)])  # Gram path (n < d) and feature path (n > d)
@pytest.mark.parametrize("form", ["auto", "gram", "feature"])
def test_cka_is_one_for_identical_and_isotropically_scaled(n, d, form):
    X = _rand(n, d)
    assert linear_cka(X, X, form=form) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 3.7 * X, form=form) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 0.01 * X + 5.0, form=form) == pytest.approx(1.0, abs=1e-12)  # centred: shifts vanish


@pytest.mark.parametrize("n,d1,d2", [(12, 40, 30), (80, 6, 9)])
def test_cka_is_symmetric_and_matches_the_direct_formula(n, d1, d2):
    X, Y = _rand(n, d1, seed=1), _rand(n, d2, seed=2)
    Y = Y + 0.5 * X[:, :1]  # some shared signal
    ref = direct_cka(X, Y)
    assert 0 < ref < 1
    for form in ("auto", "gram", "feature"):
        assert linear_cka(X, Y, form=form) == pytest.approx(ref, rel=1e-10)
        assert linear_cka(Y, X, form=form) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(X.float(), Y.float()) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("n,d", [(10, 30), (60, 5)])
def test_pairwise_cka_matches_pairs_on_both_paths(n, d):
    reps = _rand(5, n, d, seed=3)
    reps[3] = reps[1] * 2 + _rand(n, d, seed=4) * 0.1
    for form, max_bytes in (("auto", 1 << 30), ("gram", 1 << 30), ("gram", 8 * n * n * 2),
                            ("feature", 1 << 30)):
        S = pairwise_cka(reps, form=form, max_bytes=max_bytes)  # 8 n^2 * 2: Grams in blocks of two experts
        assert torch.equal(S, S.T) and torch.all(S.diagonal() == 1)
        for i in range(5):
            for j in range(5):
                if i != j:
                    assert float(S[i, j]) == pytest.approx(direct_cka(reps[i], reps[j]), rel=1e-9)
    assert pairwise_cka(reps)[1, 3] > 0.9


def test_cka_is_invariant_to_orthogonal_transforms_in_the_feature_form():
    n, d = 50, 8
    X, Y = _rand(n, d, seed=5), _rand(n, d, seed=6) + _rand(n, d, seed=5) * 0.7
    Q, _ = torch.linalg.qr(_rand(d, d, seed=7))
    base = linear_cka(X, Y, form="feature")
    assert linear_cka(X @ Q, Y, form="feature") == pytest.approx(base, rel=1e-10)
    assert linear_cka(X @ Q, Y @ Q.T, form="feature") == pytest.approx(base, rel=1e-10)
    reps = torch.stack([X, Y, X @ Q])
    S = pairwise_cka(reps, form="feature")
    assert float(S[0, 2]) == pytest.approx(1.0, abs=1e-12)
    assert float(S[1, 2]) == pytest.approx(base, rel=1e-10)


def test_constant_or_zero_representations_give_a_defined_value_and_a_warning():
    X = _rand(20, 4)
    const = torch.ones(20, 4) * 3.0
    zero = torch.zeros(20, 4)
    with pytest.warns(DegenerateRepresentationWarning):
        assert linear_cka(zero, X) == 0.0
    with pytest.warns(DegenerateRepresentationWarning):
        assert linear_cka(const, zero) == 1.0
    reps = torch.stack([X, zero, const, X * 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S = pairwise_cka(reps)
        V = pairwise_vector_cka(reps.reshape(4, -1))
    assert sum(issubclass(w.category, DegenerateRepresentationWarning) for w in caught) == 2  # once per call
    for M in (S, V):
        assert torch.isfinite(M).all()
        assert float(M[1, 2]) == 1.0 and float(M[0, 1]) == 0.0 and float(M[0, 3]) == pytest.approx(1.0)


# ---- representations ----------------------------------------------------------------------------

# plain, interleaved + biases, transposed
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_weight_cka_is_invariant_to_permuting_hidden_units(family):
    model = tiny_model(family)
    weights = ModelWeights(model)
    i = weights.layers()[0]
    access = weights.layer(i)
    before = weight_similarity(access)
    x = _rand(16, model.config.hidden_size, seed=8).float()
    out_before = access.block_output(x)
    w = access.expert_weights(3)
    gate0 = w.gate.detach().clone()
    perm = torch.randperm(w.gate.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # permute expert 3's hidden units: gate/up rows, down columns, biases
        for t in (w.gate, w.up):
            t.copy_(t[perm])
        w.down.copy_(w.down[:, perm])
        for b in (w.gate_bias, w.up_bias):
            if b is not None:
                b.copy_(b[perm])
    assert torch.equal(access.expert_weights(3).gate.detach(), gate0[perm])  # the stored weights moved
    torch.testing.assert_close(access.block_output(x), out_before, rtol=1e-5, atol=1e-6)  # same function
    torch.testing.assert_close(weight_similarity(access), before, rtol=0, atol=1e-10)


@pytest.mark.parametrize("representation", ["weight", "flat", "surrogate"])
def test_model_centric_representations_plan_without_calibration(representation):
    model = tiny_model("qwen2_moe")
    plan = make_plan_for(empty_stats(model), "dek", experts=4, weights=ModelWeights(model),
                         options={"representation": representation})
    assert plan.num_experts_out == 4
    assert all(any(len(g.members) > 1 for g in lp.groups) for lp in plan.layers)
    assert plan.layers[0].notes["representation"] == representation
    assert plan.method_config["representation"] == representation


def test_data_representation_and_calibrated_coefficients_need_a_probe():
    model = tiny_model("mixtral")
    w = ModelWeights(model)
    for options in ({}, {"representation": "weight", "coefficients": "learned"},
                    {"representation": "weight", "coefficients": "frequency"}):
        with pytest.raises(MoepruneError, match="--calib"):
            make_plan_for(empty_stats(model), "dek", experts=4, weights=w, options=options)
    with pytest.raises(MoepruneError, match="--calib"):
        make_plan_for(empty_stats(model), "hc_smoe", experts=4, weights=w)
    with pytest.raises(MoepruneError, match="representation"):
        make_plan_for(empty_stats(model), "dek", experts=4, weights=w, options={"representation": "bogus"})


# ---- grouping -----------------------------------------------------------------------------------

def test_agglomerative_cut_is_exact_even_with_ties_and_respects_routing_groups():
    D = torch.ones(8, 8) - torch.eye(8)  # every distance tied
    for k in range(1, 9):
        found = agglomerative_clusters(D, k)
        assert len(found) == k and sorted(m for c in found for m in c) == list(range(8))
    D = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    D = (D + D.T) / 2
    D[0, 7] = D[7, 0] = 0.0  # closest pair straddles the two routing groups
    groups = within_routing_groups(8, 4, 2, distance_clustering(D))
    assert [0, 7] not in groups
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    for j, g in enumerate(groups):
        assert {m // 4 for m in g} == {j // 2}
    assert [0, 7] in within_routing_groups(8, 7, 1, distance_clustering(D))


# ---- merging ------------------------------------------------------------------------------------

def _duplicate_experts(model, pairs):
    """Make expert b identical to expert a (weights, biases, router rows) in every MoE block."""
    adapter = get_adapter(model.config)
    with torch.no_grad():
        for block in adapter.moe_blocks(model).values():
            for t in adapter.expert_parameters(block).values():
                for a, b in pairs:
                    t[b].copy_(t[a])
            for owner, name, axis in adapter.router_expert_tensors(block):
                t = getattr(owner, name)
                for a, b in pairs:
                    t.select(axis, b).copy_(t.select(axis, a))


def test_merging_groups_of_identical_experts_leaves_the_layer_output_unchanged():
    # top-1 with renormalisation: a token routed to either twin gets weight 1 on it before and on
    # the merged expert after, so the block is exactly the same function (with top-2 a token could
    # pick both twins, which merging cannot reproduce)
    model = tiny_model("mixtral", top_k=1)
    _duplicate_experts(model, [(1, 2), (5, 6)])
    stats = observe(model, _ids(), batch_size=2, probe_size=64)
    w = ModelWeights(model)
    for options in ({"representation": "weight"}, {"representation": "data"}):
        plan = make_plan_for(stats, "dek", experts=6, weights=w, options=options)
        for lp in plan.layers:
            assert [[1, 2], [5, 6]] == [g.members for g in lp.groups if len(g.members) > 1]
            x = stats.layers[lp.layer].probe.inputs
            assert reconstruction_error(w.layer(lp.layer), x, lp) < 1e-10
            torch.testing.assert_close(w.layer(lp.layer).block_output(x, lp),
                                       w.layer(lp.layer).block_output(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_learned_coefficients_reconstruct_at_least_as_well_as_uniform(family):
    model = tiny_model(family)
    stats = observe(model, _ids(), batch_size=2, probe_size=96)
    w = ModelWeights(model)
    uniform = make_plan_for(stats, "dek", experts=4, weights=w)
    learned = make_plan_for(stats, "dek", experts=4, weights=w,
                            options={"coefficients": "learned", "learn_steps": 25})
    improved = 0
    for lu, ll in zip(uniform.layers, learned.layers):
        assert [g.members for g in lu.groups] == [g.members for g in ll.groups]
        for g in ll.groups:
            assert sum(g.coeffs) == pytest.approx(1.0, abs=1e-5) and min(g.coeffs) >= 0
        x = stats.layers[lu.layer].probe.inputs
        acc = w.layer(lu.layer)
        e_u, e_l = reconstruction_error(acc, x, lu), reconstruction_error(acc, x, ll)
        assert e_l <= e_u + 1e-6
        improved += e_l < e_u * 0.999
        info = ll.notes["learned"]
        assert info["relative_error"] == pytest.approx(e_l, rel=1e-3, abs=1e-6)
        assert info["relative_error_start"] == pytest.approx(e_u, rel=1e-3, abs=1e-6)
    assert improved >= 1


@pytest.mark.parametrize("aligned", [False, True])
def test_merged_block_equals_surgery(aligned):
    model = tiny_model("qwen2_moe")
    w = ModelWeights(model)
    acc = w.layer(w.layers()[0])
    groups = [[0, 3], [1], [2, 4, 5], [6, 7]]
    coeffs = [[0.3, 0.7], [1.0], [0.2, 0.5, 0.3], [0.5, 0.5]]
    lp = layer_plan(acc.layer, 8, groups, coeffs)
    if aligned:  # a permutation-aligned merge (UNCURL / M-SMoE plans) is reproduced as surgery does it
        width = acc.expert_weights(0).gate.shape[0]
        q = torch.randperm(width, generator=torch.Generator().manual_seed(1)).tolist()
        lp.groups[0].perms = [list(range(width)), q]
    mb = acc.merged_block(len(groups), aligned=lp)
    mb.set(merge_matrix_of(groups, coeffs, 8))
    x = _rand(40, model.config.hidden_size, seed=9).float()
    with torch.no_grad():
        torch.testing.assert_close(mb(x), acc.block_output(x, lp), rtol=1e-5, atol=1e-6)
    assert acc.adapter.experts(acc.block).gate_up_proj.shape[0] == 8  # the original is untouched


# ---- checkpoints --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("method,options", [("dek", {"coefficients": "learned", "learn_steps": 5}),
                                            ("hc_smoe", {})])
def test_merged_checkpoints_reload_with_stock_transformers(family, method, options, checkpoint, calib_file,
                                                           tmp_path):
    src = checkpoint(family)
    out = api.prune(src, method, tmp_path / "out", experts=4, calib=str(calib_file), samples=4, seq_len=32,
                    probe_size=64, progress=False, options=options)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.method == method and plan.num_experts_out == 4
    assert any(len(g.members) > 1 for lp in plan.layers for g in lp.groups), "a merge, not a pruning"
    if family == "deepseek_v3":  # n_group=2: every output expert comes from one routing group, in order
        for lp in plan.layers:
            assert [{m // 4 for m in g.members} for g in lp.groups] == [{0}, {0}, {1}, {1}]

    original = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    in_memory = apply_plan(copy.deepcopy(original), plan)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert getattr(reloaded.config, COUNT_FIELD[family]) == 4
    adapter = get_adapter(reloaded.config)
    for block in adapter.moe_blocks(reloaded).values():
        for name, p in adapter.experts(block).named_parameters():
            assert p.shape[0] == 4, name
        assert adapter.router(block).weight.shape[0] == 4
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in original.parameters())
    ids = _ids(1, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits, rtol=0, atol=1e-6)


def test_hc_smoe_clusters_mean_outputs_and_merges_by_frequency():
    model = tiny_model("mixtral")
    stats = observe(model, _ids(), batch_size=2, probe_size=64)
    w = ModelWeights(model)
    plan = make_plan_for(stats, "hc_smoe", experts=4, weights=w)
    for lp in plan.layers:
        ls, acc = stats.layers[lp.layer], w.layer(lp.layer)
        means = mean_outputs(acc, ls)
        expected = within_routing_groups(8, 4, 1, distance_clustering(output_distance(means), "average"))
        assert [g.members for g in lp.groups] == expected
        for g in lp.groups:
            counts = ls.experts.count[g.members]
            if len(g.members) > 1 and counts.sum() > 0:
                assert g.coeffs == pytest.approx((counts / counts.sum()).tolist())
    cos = make_plan_for(stats, "hc_smoe", experts=4, weights=w, options={"metric": "cosine"})
    assert cos.layers[0].notes["metric"] == "cosine"


# ---- command line -------------------------------------------------------------------------------

def test_cli_prunes_with_dek_weight_representation_without_calibration(checkpoint, tmp_path, capsys):
    src = checkpoint("mixtral")
    out = tmp_path / "dek"
    assert main(["prune", str(src), "--method", "dek", "--out", str(out), "--experts", "4",
                 "-o", "representation=weight", "-o", "router_merge=sum"]) == 0
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.method_config["representation"] == "weight" and plan.layers[0].router_merge == "sum"
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_local_experts == 4
    capsys.readouterr()
    assert main(["prune", str(src), "--method", "dek", "--out", str(tmp_path / "x"), "--experts", "4"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
