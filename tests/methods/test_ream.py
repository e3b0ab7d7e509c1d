"""REAM: saliency, similarity readings, pseudo-pruning groups, aligned merges, options, the full prune."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from helpers import COUNT_FIELD, token_ids
from helpers import observed as _observed

from moeprune import api
from moeprune.arch import ExpertWeights, get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods import get_method
from moeprune.methods.ream import (
    ReamConfig,
    alignment_cost,
    hidden_activations,
    logit_similarity,
    match_units,
    output_similarity,
    pseudo_groups,
    saliency,
    similarity,
    weight_features,
    weight_rows,
)
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Plan
from moeprune.surgery import apply_plan
from moeprune.surgery.alignment import permute_expert_hidden

C3 = {"group_size": 3}  # 8 experts into 4 groups of at most 3: the groups are not all one big group


@pytest.fixture(scope="module")
def mixtral():
    model = tiny_model("mixtral")
    return model, _observed(model), ModelWeights(model)


def _plan(model_stats_weights, experts=4, **options) -> Plan:
    _, stats, weights = model_stats_weights
    return api.make_plan_for(stats, "ream", experts=experts, weights=weights, options=options)


def _reap(ls) -> torch.Tensor:
    s = (ls.experts.reap_sum / ls.experts.count.clamp(min=1)).double()
    return torch.where(s > 0, s, s[s > 0].min())


# ---- pseudo-pruning groups on synthetic saliency and similarity ----------------------------------------

def test_groups_follow_the_greedy_rule_in_saliency_order():
    s = torch.tensor([5.0, 1.0, 4.0, 0.5, 0.2, 3.0, 0.1, 0.3])  # centroids (k=3): 0, 2, 5 in that order
    S = torch.zeros(8, 8)
    # every non-centroid is most similar to centroid 0, so 0 takes the C - 1 best and 2 the next ones
    for e, v in {1: 0.9, 3: 0.8, 4: 0.7, 6: 0.6, 7: 0.5}.items():
        S[0, e] = S[e, 0] = v
        S[2, e] = S[e, 2] = v / 2
    assert pseudo_groups(list(range(8)), 3, s, S, 3) == [[0, 1, 3], [2, 4, 6], [5, 7]]
    # with C = 6 the first centroid takes everyone and the others stay alone
    assert pseudo_groups(list(range(8)), 3, s, S, 6) == [[0, 1, 3, 4, 6, 7], [2], [5]]
    # C = 0: every non-centroid joins its most similar centroid
    S[5, 7] = S[7, 5] = 0.95
    assert pseudo_groups(list(range(8)), 3, s, S, 0) == [[0, 1, 3, 4, 6], [2], [5, 7]]


def test_ties_go_to_the_lowest_id():
    s = torch.ones(4)
    assert pseudo_groups([0, 1, 2, 3], 2, s, torch.zeros(4, 4), 2) == [[0, 2], [1, 3]]


def test_a_group_size_that_cannot_hold_every_expert_is_refused():
    with pytest.raises(MoepruneError, match="group_size >= 3") as e:
        pseudo_groups(list(range(8)), 3, torch.ones(8), torch.zeros(8, 8), 2)
    assert "\n" not in str(e.value)


# ---- similarity readings on hand-computed examples ---------------------------------------------------

def test_output_similarity_per_token_and_of_means():
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]])  # [E=2, n=2, D=2]
    gates = torch.full((2, 2), 0.5)
    token = output_similarity(out, gates, "token")
    assert token[0, 1].item() == pytest.approx(1.0)  # the same direction on every token
    cos = 0.75 / (math.sqrt(0.5) * math.sqrt(1.25))  # of the means [.5, .5] and [.5, 1]
    mean = output_similarity(out, gates, "mean")
    assert mean[0, 1].item() == pytest.approx((cos + 1) / 2)
    # the gate weighs the tokens of the mean reading (here token 2 of expert 1 is gated out)
    gated = output_similarity(out, torch.tensor([[0.5, 1.0], [0.5, 0.0]]), "mean")
    assert gated[0, 1].item() == pytest.approx((math.sqrt(0.5) + 1) / 2)
    assert output_similarity(out, torch.tensor([[0.5, 1.0], [0.5, 0.0]]), "token")[0, 1].item() == \
        pytest.approx(0.75)  # token 2 has a zero gated output: cosine 0 there


def test_logit_similarity_cosine_and_distance():
    logits = torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, 0.0]])  # [n=2, E=3]: columns (1,0), (1,1), (-1,0)
    cos = logit_similarity(logits, "cosine")
    assert cos[0, 1].item() == pytest.approx((math.sqrt(0.5) + 1) / 2)
    assert cos[0, 2].item() == pytest.approx(0.0)
    dist = logit_similarity(logits, "distance")
    d01 = math.sqrt((1 - math.sqrt(0.5)) ** 2 + 0.5)  # unit columns (1,0) and (.71,.71); d_max = 2
    assert dist[0, 1].item() == pytest.approx(1 - d01 / 2)
    assert dist[0, 2].item() == pytest.approx(0.0)


# ---- the plan on a tiny Mixtral ---------------------------------------------------------------------

def test_plan_centroids_groups_and_coefficients(mixtral):
    model, stats, weights = mixtral
    plan = _plan(mixtral, **C3)
    cfg = ReamConfig(**C3)
    for lp in plan.layers:
        ls = stats.layers[lp.layer]
        s = _reap(ls)
        top = sorted(range(8), key=lambda e: (-float(s[e]), e))[:4]
        assert lp.notes["centroids"] == sorted(top, key=min_member(lp))  # one centroid per output expert
        members = [m for g in lp.groups for m in g.members]
        assert sorted(members) == list(range(8))  # disjoint, and every expert merged into some group
        assert all(len(g.members) <= 3 for g in lp.groups)
        for g, c in zip(lp.groups, lp.notes["centroids"]):
            assert c in g.members
            want = s[g.members] / s[g.members].sum()
            assert torch.allclose(torch.tensor(g.coeffs, dtype=torch.float64), want, atol=1e-12)
        # the rule: in saliency order, each centroid took its most similar unassigned experts
        outputs = weights.layer(lp.layer).expert_outputs(ls.probe.inputs)
        S = similarity(ls, outputs, cfg)
        free = set(range(8)) - set(top)
        by_centroid = {c: g for g, c in zip(lp.groups, lp.notes["centroids"])}
        for c in top:
            took = sorted(set(by_centroid[c].members) - {c})
            best = sorted(free, key=lambda e: (-float(S[c, e]), e))[:2]
            assert took == sorted(best)
            free -= set(took)


def min_member(lp):
    """Sort key placing each centroid where its group sits in the plan (groups ordered by smallest member)."""
    where = {c: min(g.members) for g, c in zip(lp.groups, lp.notes["centroids"])}
    return lambda c: where[c]


def test_permutations_are_valid_and_beat_the_identity(mixtral):
    model, stats, weights = mixtral
    plan = _plan(mixtral, **C3)
    checked = 0
    for lp in plan.layers:
        access = weights.layer(lp.layer)
        x = stats.layers[lp.layer].probe.inputs
        for g, c in zip(lp.groups, lp.notes["centroids"]):
            if len(g.members) == 1:
                assert g.perms is None
                continue
            I = access.expert_weights(c).up.shape[0]
            assert g.perms[g.members.index(c)] == list(range(I))
            with torch.no_grad():
                outs = access.expert_outputs(x)
                acts = hidden_activations(access, x, g.members, outs)
            for m, perm in zip(g.members, g.perms):
                assert sorted(perm) == list(range(I))
                if m == c:
                    continue
                matched = (acts[c] * acts[m][perm]).sum()  # summed cosine of matched unit activations
                identity = (acts[c] * acts[m]).sum()
                assert matched > identity
                checked += 1
    assert checked


def test_alignment_recovers_a_known_permutation():
    model = tiny_model("mixtral")
    adapter = get_adapter(model.config)
    block = next(iter(adapter.moe_blocks(model).values()))
    params = {k: v.detach().clone() for k, v in adapter.expert_parameters(block).items()}
    I = params["down_proj"].shape[2]
    p = torch.randperm(I, generator=torch.Generator().manual_seed(3))
    for name in params:  # expert 1 := expert 0 with its hidden units shuffled by p
        params[name][1] = params[name][0]
    permute_expert_hidden(adapter, params, 1, p)
    with torch.no_grad():
        for name, value in params.items():
            getattr(adapter.experts(block), name).copy_(value)
    stats = _observed(model)
    inverse = torch.empty_like(p)
    inverse[p] = torch.arange(I)
    access = ModelWeights(model).layer(min(stats.layers))
    x = stats.layers[min(stats.layers)].probe.inputs
    with torch.no_grad():
        acts = hidden_activations(access, x, [0, 1], access.expert_outputs(x))
        weights = weight_features(access, [0, 1], 64)
    for a, w in ((acts, weights), (acts, None), (None, weights)):  # align = both, activations, weights
        assert match_units(alignment_cost(0, 1, a, w)) == inverse.tolist()
        assert match_units(alignment_cost(1, 0, a, w)) == p.tolist()


# ---- options -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_options_change_the_plan(mixtral):
    model, stats, weights = mixtral
    base = _plan(mixtral, **C3)
    assert all(lp.notes["alignment"] == "both" for lp in base.layers)
    groups = lambda plan: [[g.members for g in lp.groups] for lp in plan.layers]  # noqa: E731
    coeffs = lambda plan: [[g.coeffs for g in lp.groups] for lp in plan.layers]  # noqa: E731
    perms = lambda plan: [[g.perms for g in lp.groups] for lp in plan.layers]  # noqa: E731
    assert groups(_plan(mixtral, group_size=8)) != groups(base)
    assert groups(_plan(mixtral, group_size=0)) != groups(base)
    sq = _plan(mixtral, saliency="reap_squared", **C3)
    assert coeffs(sq) != coeffs(base)
    ls = stats.layers[0]
    outputs = weights.layer(0).expert_outputs(ls.probe.inputs)
    readings = [similarity(ls, outputs, ReamConfig(output_similarity=o, logit_similarity=g))
                for o in ("token", "mean") for g in ("cosine", "distance", "none")]
    assert all(not torch.allclose(a, b) for i, a in enumerate(readings) for b in readings[i + 1:])
    none = _plan(mixtral, align="none", **C3)
    assert all(g.perms is None for lp in none.layers for g in lp.groups) and groups(none) == groups(base)
    assert perms(_plan(mixtral, align="weights", **C3)) != perms(base)
    whole = _plan(mixtral, align="weights", weight_pca=0, **C3)
    assert perms(whole) != perms(_plan(mixtral, align="weights", **C3))
    summed = _plan(mixtral, router_merge="sum", **C3)
    assert {lp.router_merge for lp in summed.layers} == {"sum"}


def test_saliency_reap_squared_is_the_codes_g_squared_norm_on_the_probe(mixtral):
    model, stats, weights = mixtral
    ls = stats.layers[0]
    outputs = weights.layer(0).expert_outputs(ls.probe.inputs)  # [E, n, H]
    s = saliency(ls, outputs, 2, "reap_squared")
    g = torch.softmax(ls.probe.router_logits.double(), dim=-1)  # [n, E]
    top2 = ls.probe.router_logits.topk(2, dim=-1).indices
    for e in range(8):
        rows = [t for t in range(g.shape[0]) if e in top2[t].tolist()]
        want = sum(float(g[t, e]) ** 2 * float(outputs[e, t].double().norm()) for t in rows) / len(rows)
        assert float(s[e]) == pytest.approx(want, rel=1e-9)
    assert torch.equal(saliency(ls, outputs, 2, "reap"), _reap(ls))


@pytest.mark.parametrize("options, match", [
    ({"group_size": -1}, "group_size"),
    ({"group_size": 2.5}, "group_size"),
    ({"saliency": "freq"}, "saliency"),
    ({"output_similarity": "max"}, "output_similarity"),
    ({"logit_similarity": "l1"}, "logit_similarity"),
    ({"align": True}, "align"),
    ({"weight_pca": -3}, "weight_pca"),
    ({"router_merge": "first"}, "router_merge"),
    ({"centroids": 3}, "no option"),
])
def test_bad_options_are_refused_in_one_line(options, match):
    with pytest.raises(MoepruneError, match=match) as e:
        get_method("ream").default_config(**options)
    assert "\n" not in str(e.value)


def test_a_budget_the_group_size_cannot_hold_is_refused_before_any_layer(mixtral, monkeypatch):
    from moeprune.methods import ream

    calls = []
    monkeypatch.setattr(ream, "plan_layer", lambda *a: calls.append(a))
    with pytest.raises(MoepruneError, match="group_size >= 3") as e:
        _plan(mixtral, experts=3, group_size=2)
    assert "\n" not in str(e.value) and not calls


def test_without_probe_tokens_ream_is_refused(mixtral):
    model, stats, weights = mixtral
    empty = copy.deepcopy(stats)
    for ls in empty.layers.values():
        ls.probe.inputs = ls.probe.inputs[:0]
        ls.probe.router_logits = ls.probe.router_logits[:0]
    with pytest.raises(MoepruneError, match="--calib"):
        api.make_plan_for(empty, "ream", experts=4, weights=weights)


def test_ream_is_layer_local():
    spec = get_method("ream")
    assert spec.layer_local(spec.default_config()) and spec.needs_weights and spec.kind == "merge"


@pytest.mark.slow
def test_families_whose_activations_cannot_be_reproduced_fall_back_to_weights():
    model = tiny_model("gpt_oss")  # its clamped GLU is not ACT2FN[hidden_act](gate) * up
    plan = api.make_plan_for(_observed(model), "ream", experts=4, weights=ModelWeights(model), options=C3)
    assert all(lp.notes["alignment"].startswith("weights") for lp in plan.layers)
    assert any(g.perms for lp in plan.layers for g in lp.groups if len(g.members) > 1)


def test_group_limited_routing_keeps_every_output_expert_in_one_routing_group():
    model = tiny_model("deepseek_v3")  # n_group = 2: experts 0-3 and 4-7
    plan = api.make_plan_for(_observed(model), "ream", experts=4, weights=ModelWeights(model))
    for lp in plan.layers:
        assert [{m // 4 for m in g.members} for g in lp.groups] == [{0}, {0}, {1}, {1}]
    apply_plan(copy.deepcopy(model), plan)


# ---- the full prune ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sequential", [False, True])
def test_prune_writes_a_checkpoint_that_reloads(checkpoint, calib_file, tmp_path, sequential):
    src = checkpoint("mixtral")
    out = api.prune(src, "ream", tmp_path / "out", experts=4, calib=str(calib_file), samples=4, seq_len=32,
                    probe_size=64, progress=False, layerwise=True, sequential=sequential, options=C3,
                    compensate="none")
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.method == "ream" and plan.num_experts_out == 4
    assert any(len(g.members) > 1 and g.perms for lp in plan.layers for g in lp.groups)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert getattr(reloaded.config, COUNT_FIELD["mixtral"]) == 4
    in_memory = apply_plan(tf.AutoModelForCausalLM.from_pretrained(str(src)).eval(), plan)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-5)
    if sequential:  # later layers were observed on the merged earlier ones: their plans may differ
        plain = api.prune(src, "ream", tmp_path / "plain", experts=4, calib=str(calib_file), samples=4,
                          seq_len=32, probe_size=64, progress=False, layerwise=True, options=C3,
                          compensate="none")
        first = Plan.load(plain / "moeprune_plan.json")
        assert first.layers[0].groups == plan.layers[0].groups  # layer 0 sees the same inputs
        later = [lp.notes["saliency"] for lp in plan.layers[1:]]
        assert [lp.notes["saliency"] for lp in first.layers[1:]] != later


class _LowRankExperts:
    """A stand-in for `LayerWeights`: 6 experts whose weight rows lie near a 4-dimensional subspace."""

    num_experts = 6

    def __init__(self, I=16, H=8):
        g = torch.Generator().manual_seed(0)
        scale = torch.tensor([8.0, 4, 2, 1], dtype=torch.float64)[:, None]
        basis = torch.randn(4, 3 * H, generator=g, dtype=torch.float64) * scale
        self.rows = [torch.randn(I, 4, generator=g, dtype=torch.float64) @ basis
                     + 1e-3 * torch.randn(I, 3 * H, generator=g, dtype=torch.float64) for _ in range(6)]
        self.H = H

    def expert_weights(self, e):
        r, H = self.rows[e], self.H
        return ExpertWeights(gate=r[:, :H], up=r[:, H:2 * H], down=r[:, 2 * H:].T)


def test_weight_pca_is_deterministic_and_finds_the_leading_axes():
    access = _LowRankExperts()
    a = weight_features(access, [0, 1], 4)
    assert all(torch.equal(a[e], weight_features(access, [0, 1], 4)[e]) for e in (0, 1))
    rows = {e: weight_rows(access, e) for e in range(6)}
    X = torch.cat(list(rows.values()))
    mean = X.mean(0)
    lam, V = torch.linalg.eigh((X - mean).T @ (X - mean))
    P = V[:, -4:] * lam[-4:].sqrt()  # the 4 leading axes, scaled by the singular values
    exact = {e: (rows[e] - mean) @ P for e in (0, 1)}
    exact = {e: v / v.norm(dim=1, keepdim=True) for e, v in exact.items()}
    # axes are defined up to sign, distances between the projected rows are not
    torch.testing.assert_close(torch.cdist(a[0], a[1]), torch.cdist(exact[0], exact[1]), rtol=1e-4, atol=1e-4)
    assert weight_features(access, [0], 0)[0].shape == (16, 24)  # no PCA: the unit rows themselves
