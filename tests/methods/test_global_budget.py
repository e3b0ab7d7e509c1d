"""--budget global: the exact allocation, damage curves on tiny models, the plan field, the per-layer
checkpoint format (moeprune loads it exactly, stock transformers refuses it) and the refusals."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import transformers
from helpers import manual_plan, observed, saved_shapes, saved_tensors

import moeprune
from moeprune.api import apply_checkpoint, inspect
from moeprune.api import prune as prune_model
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods import PlanRequest, make_plan_for
from moeprune.methods.budget import BudgetChoice, allocate, floor, global_budget_plan, summed_damage
from moeprune.methods.naee import SubsetScorer
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Plan
from moeprune.store.checkpoint import checkpoint_parameters, export_stock, load_model, parameter_counts
from moeprune.surgery import apply_plan

# compensation off: these tests compare with the plan applied in memory, which does not refit
PRUNE = dict(samples=8, seq_len=32, batch_size=4, probe_size=128, progress=False, compensate="none")


# ---- allocation (pure) -----------------------------------------------------------------------------

def test_allocation_is_the_exact_optimum_of_non_convex_curves():
    """The min-plus programme matches brute force over every allocation, floor and total included."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        L, U = 3, 4
        # decreasing in the count (more kept, less damage) but not convex
        curves = {i: sorted(torch.rand(U + 1, generator=gen).tolist(), reverse=True) for i in range(L)}
        for units in range(0, L * U + 1, 3):
            got = allocate(curves, units, uniform=units // L)
            assert sum(got.values()) == units and all(0 <= u <= U for u in got.values())
            best = min(sum(curves[i][u] for i, u in enumerate(c))
                       for c in itertools.product(range(U + 1), repeat=L) if sum(c) == units)
            assert sum(curves[i][u] for i, u in got.items()) == pytest.approx(best, abs=1e-9)


def test_allocation_gives_the_damaged_layer_more_and_ties_stay_uniform():
    steep, flat = [9.0, 4.0, 1.0, 0.5, 0.0], [0.2, 0.15, 0.1, 0.05, 0.0]
    got = allocate({0: flat, 1: steep}, 4, uniform=2)
    assert got[1] > got[0] and sum(got.values()) == 4
    assert allocate({0: [0.0] * 5, 1: [0.0] * 5, 2: [0.0] * 5}, 6, uniform=2) == {0: 2, 1: 2, 2: 2}


def test_floor_defaults_and_checks():
    choice = BudgetChoice("global")
    assert floor(choice, keep=4, num_experts=8, top_k=2) == 2
    assert floor(choice, keep=48, num_experts=64, top_k=8) == 16
    assert floor(choice, keep=8, num_experts=64, top_k=8) == 8  # never above the uniform count
    assert floor(choice, keep=4, num_experts=8, top_k=2, n_group=2) == 4  # two per routing group
    for bad, keep, n_group, what in ((1, 4, 1, "below 2"), (5, 4, 1, "above"), (5, 6, 2, "multiple"),
                                     (2, 4, 2, "below 4")):
        with pytest.raises(MoepruneError, match=what):
            floor(BudgetChoice("global", bad), keep=keep, num_experts=8, top_k=2, n_group=n_group)


# ---- damage curves on tiny models -----------------------------------------------------------------

def _global(model, method="reap", keep=4, floor_=None):
    stats = observed(model)
    request = PlanRequest(stats, keep, False, ModelWeights(model))
    return stats, global_budget_plan(method, request, BudgetChoice("global", floor_))


def test_a_layer_that_loses_nothing_keeps_only_the_floor():
    """Layer 0's router can never pick experts 2..7: removing them costs nothing there, so the other
    layers get the experts it gives up."""
    model = tiny_model("gpt_oss")
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    first = min(blocks)
    with torch.no_grad():
        adapter.router(blocks[first]).bias[2:] = -100.0
    _, plan = _global(model)
    counts = {lp.layer: lp.num_experts_out for lp in plan.layers}
    assert counts[first] == 2  # the floor, max(top-k, E/4)
    assert sum(counts.values()) == 4 * len(counts)  # the uniform total
    assert sum(c for i, c in counts.items() if i != first) == 4 * (len(counts) - 1) + 2  # given to the others
    assert plan.layer(first).notes["budget"]["damage"][0] == pytest.approx(0, abs=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reap", "frequency", "hc_smoe"])
def test_summed_damage_is_at_most_uniform_and_the_curves_are_the_real_damage(method):
    model = tiny_model("mixtral")
    stats, plan = _global(model, method)
    ours, uniform = summed_damage(plan)
    assert ours <= uniform + 1e-12
    counts = [lp.num_experts_out for lp in plan.layers]
    assert min(counts) >= 2 and sum(counts) == 4 * len(counts)
    # the uniform damage the notes record is the uniform plan's measured block-output error
    weights = ModelWeights(model)
    flat = make_plan_for(stats, method, experts=4, weights=weights)
    measured = 0.0
    for lp in flat.layers:
        access, x = weights.layer(lp.layer), stats.layers[lp.layer].probe.inputs
        scorer = SubsetScorer(access, x)
        error = float((scorer.Z - access.block_output(x, lp)).double().norm())  # a merge's too
        measured += (error / scorer.z_norm) ** 2
    assert measured == pytest.approx(uniform, rel=1e-4)


def test_group_limited_routing_moves_in_whole_groups():
    _, plan = _global(tiny_model("deepseek_v3"))  # two routing groups of 4
    counts = [lp.num_experts_out for lp in plan.layers]
    assert all(c % 2 == 0 and c >= 4 for c in counts) and sum(counts) == 4 * len(counts)
    plan.validate()


# ---- the plan field -------------------------------------------------------------------------------

def test_per_layer_counts_need_a_global_plan_and_round_trip(tmp_path):
    model = tiny_model("mixtral")
    plan = manual_plan(model, keep=[0, 1, 2, 3])
    plan.layers[0].groups = plan.layers[0].groups[:2]
    with pytest.raises(MoepruneError, match="different expert counts per layer"):
        plan.validate()
    plan.budget = "global"
    plan.validate()
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.budget == "global"
    assert [lp.num_experts_out for lp in back.layers] == [2] + [4] * (len(back.layers) - 1)
    assert back.to_dict() == plan.to_dict() and back.num_experts_out == 4
    d = plan.to_dict()
    d["budget"] = 3
    with pytest.raises(MoepruneError, match="budget must be a string"):
        Plan.from_dict(d)
    d["budget"] = "local"
    with pytest.raises(MoepruneError, match="budget 'local' is not one of"):
        Plan.from_dict(d).validate()


def test_uniform_plans_keep_their_json(tmp_path):
    plan = manual_plan(tiny_model("mixtral"), keep=[0, 1, 2, 3])
    plan.save(tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    assert "budget" not in json.loads(text)
    Plan.load(tmp_path / "p.json").save(tmp_path / "q.json")
    assert (tmp_path / "q.json").read_text() == text


# ---- the whole prune: written, reloaded, refused by stock loaders --------------------------------

@pytest.mark.slow
def test_global_prune_writes_a_checkpoint_moeprune_reloads_exactly(checkpoint, calib_file, tmp_path):
    src = checkpoint("mixtral")
    out = prune_model(src, "reap", tmp_path / "o", experts=4, calib=str(calib_file), budget="global", **PRUNE)
    plan = Plan.load(out / "moeprune_plan.json")
    counts = {lp.layer: lp.num_experts_out for lp in plan.layers}
    assert plan.budget == "global" and len(set(counts.values())) > 1
    assert sum(counts.values()) == 4 * len(counts)
    # each layer's tensors are stored with its own count, in the original per-expert key layout
    shapes = saved_shapes(out)
    for i, r in counts.items():
        stored = {int(k.split(".experts.")[1].split(".")[0]) for k in shapes
                  if k.startswith(f"model.layers.{i}.") and ".experts." in k}
        assert stored == set(range(r))
    # reloads with the logits of the original model pruned in memory by the same plan
    reference = apply_plan(copy.deepcopy(load_model(src)), plan)
    loaded = moeprune.from_pretrained(out)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert checkpoint_parameters(out) == {**parameter_counts(reference), "novices": 0}
    facts = inspect(out)
    assert facts["experts_per_layer"] == counts and facts["parameters"] == checkpoint_parameters(out)
    # `moeprune apply` of the plan writes the same per-layer checkpoint
    applied = apply_checkpoint(src, plan, tmp_path / "a", progress=False)
    assert saved_tensors(applied).keys() == saved_tensors(out).keys()
    assert all(torch.equal(saved_tensors(applied)[k], v) for k, v in saved_tensors(out).items())
    # the whole-model source plans and writes the same
    again = prune_model(src, "reap", tmp_path / "m", experts=4, calib=str(calib_file), budget="global",
                        layerwise=False, **PRUNE)
    assert Plan.load(again / "moeprune_plan.json").to_dict() == plan.to_dict()
    # stock transformers refuses it, saying how to load it; there is no stock export
    with pytest.raises(ValueError, match="moeprune.from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with pytest.raises(MoepruneError, match="different expert counts"):
        export_stock(out, tmp_path / "stock")
    assert "moeprune.from_pretrained" in (out / "README.md").read_text()


@pytest.mark.slow
def test_global_budget_with_compensation_fits_each_layer_on_a_second_walk(checkpoint, calib_file, tmp_path):
    src = checkpoint("mixtral")
    plain = prune_model(src, "reap", tmp_path / "p", experts=4, calib=str(calib_file), budget="global",
                        **PRUNE)
    fitted = prune_model(src, "reap", tmp_path / "f", experts=4, calib=str(calib_file), budget="global",
                         **{**PRUNE, "compensate": "down"})
    a, b = Plan.load(plain / "moeprune_plan.json"), Plan.load(fitted / "moeprune_plan.json")
    assert [lp.kept for lp in a.layers] == [lp.kept for lp in b.layers]  # the allocation is the first walk's
    assert b.compensation["fit"] == "down" and b.calibration.get("sequential") is True
    assert all("compensation" in lp.notes for lp in b.layers)
    accepted = [lp.layer for lp in b.layers if lp.notes["compensation"].get("applied")]
    ta, tb = saved_tensors(plain), saved_tensors(fitted)
    changed = {int(k.split(".")[2]) for k in ta if not torch.equal(ta[k], tb[k])}
    assert accepted and changed == set(accepted)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(moeprune.from_pretrained(fitted)(ids).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "glm4_moe", "llama4_text"])
def test_per_layer_checkpoints_reload_exactly_across_families(family, checkpoint, calib_file, tmp_path):
    """Shared experts, router biases, group-limited routing and score-scaled inputs all survive the
    per-layer skeleton."""
    src = checkpoint(family)
    out = prune_model(src, "reap", tmp_path / "o", experts=4, calib=str(calib_file), budget="global", **PRUNE)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.per_layer_counts
    reference = apply_plan(copy.deepcopy(load_model(src)), plan)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(moeprune.from_pretrained(out)(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_equal_counts_stay_a_stock_checkpoint(checkpoint, calib_file, tmp_path):
    """DeepSeek-V3's tiny routing groups leave no room (the floor is the uniform count): stock output."""
    out = prune_model(checkpoint("deepseek_v3"), "reap", tmp_path / "o", experts=4, calib=str(calib_file),
                      budget="global", **PRUNE)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.budget == "global" and not plan.per_layer_counts
    transformers.AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.parametrize("kwargs,what", [
    (dict(budget="sideways"), "--budget 'sideways' is not one of"),
    (dict(budget_floor=2), "--budget-floor sets the fewest"),
    (dict(budget="global", budget_floor=6), "above the uniform count 4"),
    (dict(budget="global", budget_floor=1), "below 2"),
    (dict(budget="global", sequential=True), "--sequential plans each layer"),
    (dict(budget="global", method="mone"), "novice checkpoint keeps one expert count"),
    (dict(budget="global", method="auto", options={"format": "novices", "candidates": "reap"}),
     "novice checkpoint keeps one"),
    (dict(budget="global", calib=None), "needs calibration text|--budget global measures"),
    (dict(budget="global", flatten_groups=True, family="deepseek_v3"), "which --flatten-groups removes"),
])
def test_bad_budget_options_are_refused_in_one_line_before_any_work(checkpoint, calib_file, tmp_path,
                                                                    kwargs, what):
    args = {**PRUNE, "calib": str(calib_file), "method": "reap", "family": "mixtral", **kwargs}
    method, family = args.pop("method"), args.pop("family")
    with pytest.raises(MoepruneError, match=what) as e:
        prune_model(checkpoint(family), method, tmp_path / "o", experts=4, **args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,what", [
    (["--budget", "global", "--budget-floor", "5"], "--budget-floor 5 is above the uniform count 4"),
    (["--budget", "everywhere"], "--budget 'everywhere' is not one of uniform, global"),
])
def test_cli_budget_flags_are_refused_in_one_line(checkpoint, calib_file, tmp_path, capsys, flags, what):
    from moeprune.cli import main

    argv = ["prune", str(checkpoint("mixtral")), "--method", "reap", "--out", str(tmp_path / "o"), "--calib",
            str(calib_file), "--experts", "4", "--samples", "8", "--seq-len", "32", *flags]
    capsys.readouterr()
    assert main(argv) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and what in lines[0], lines
    assert not (tmp_path / "o").exists()
