"""Plans: JSON round trip, budgets, and every check validate() makes, including group-limited routing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import token_ids

from moeprune import api
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.observe import observe
from moeprune.plan import Group, LayerPlan, Plan, budget
from moeprune.surgery import apply_plan

E = 8
MIXTRAL = {"model_type": "mixtral", "num_experts": E, "top_k": 2, "n_group": 1, "min_experts_per_group": 2,
           "hidden_size": 64, "moe_layers": [0, 1, 2]}
DEEPSEEK = {"model_type": "deepseek_v3", "num_experts": E, "top_k": 2, "n_group": 2,
            "min_experts_per_group": 2, "hidden_size": 64, "moe_layers": [1, 2]}


def plan_of(model: dict, groups_per_layer, **kw) -> Plan:
    """groups_per_layer: one list of member lists per MoE layer (coefficients uniform)."""
    layers = []
    for layer, groups in zip(model["moe_layers"], groups_per_layer):
        layers.append(LayerPlan(layer, model["num_experts"],
                                [Group(list(m), [1.0 / len(m)] * len(m)) for m in groups]))
    return Plan(method="manual", layers=layers, model=dict(model), **kw)


def singletons(*ids):
    return [[e] for e in ids]


# ---- JSON -------------------------------------------------------------------------------------

def test_plan_json_round_trip(tmp_path):
    plan = Plan(
        method="manual",
        layers=[
            LayerPlan(1, E, [Group([0, 1], [0.25, 0.75]), Group([2], [1.0]),
                             Group([4, 5, 6], [0.2, 0.3, 0.5]), Group([7], [1.0])],
                      router_merge="sum", notes={"why": "test", "scores": [1.5, 2]}),
            LayerPlan(2, E, [Group([e], [1.0]) for e in (0, 3, 4, 7)]),
        ],
        model=dict(DEEPSEEK), method_config={"seed": 3, "linkage": "average"},
        calibration={"source": "calib.txt", "tokens": 256}, flatten_groups=True,
    )
    plan.validate()
    path = tmp_path / "plan.json"
    plan.save(path)
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["num_experts_out"] == 4 and raw["method"] == "manual"
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.layers[0].groups[2].coeffs == [0.2, 0.3, 0.5]
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert not loaded.layers[0].is_pruning and loaded.layers[1].is_pruning
    assert loaded.layers[0].dropped == [3]


def test_plan_from_real_stats_round_trips(tmp_path):
    model = tiny_model("qwen2_moe")
    stats = observe(model, token_ids(4, 32), batch_size=2, probe_size=16)
    plan = api.make_plan_for(stats, "reap", ratio=0.25)
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    assert plan.num_experts_out == 6 and [lp.layer for lp in plan.layers] == [1, 2]


@pytest.mark.parametrize("text", ["not json", '{"version": 99, "layers": []}', '{"version": 1}'])
def test_bad_plan_files_are_refused(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(MoepruneError):
        Plan.load(path)
    with pytest.raises(MoepruneError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


# ---- validate() ---------------------------------------------------------------------------------

def test_valid_plans_pass():
    plan_of(MIXTRAL, [singletons(0, 1, 2, 3)] * 3).validate()
    plan_of(MIXTRAL, [[[0, 1], [2, 3], [4], [5]]] * 3).validate()
    plan_of(DEEPSEEK, [singletons(0, 1, 4, 5)] * 2).validate()
    plan_of(DEEPSEEK, [[[0, 1], [2], [3], [4], [5, 6], [7]]] * 2).validate()


@pytest.mark.parametrize("groups_per_layer,message", [
    ([[[0, 1], [1], [2]]] * 3, "more than one"),  # overlapping groups
    ([singletons(0, 1, 1)] * 3, "more than one"),  # repeated id
    ([singletons(0, 1, 8)] * 3, "out of range"),
    ([singletons(-1, 1, 2)] * 3, "out of range"),
    ([singletons(3)] * 3, "top-k"),  # r < top_k
    ([[[0, 1, 2, 3, 4, 5, 6, 7]]] * 3, "top-k"),  # everything merged into one expert
    ([singletons(0, 1, 2), singletons(0, 1, 2, 3), singletons(0, 1, 2)], "different expert counts"),
])
def test_validate_rejects(groups_per_layer, message):
    with pytest.raises(MoepruneError, match=message):
        plan_of(MIXTRAL, groups_per_layer).validate()


def test_validate_rejects_structural_mismatches():
    plan = plan_of(MIXTRAL, [singletons(0, 1, 2, 3)] * 3)
    with pytest.raises(MoepruneError, match="experts"):
        plan.validate({**MIXTRAL, "num_experts": 16})
    with pytest.raises(MoepruneError, match="not an MoE layer"):
        plan.validate({**MIXTRAL, "moe_layers": [1, 2]})
    bad = copy.deepcopy(plan)
    bad.layers[0].groups[0].coeffs = [1.0, 0.5]
    with pytest.raises(MoepruneError, match="coefficient"):
        bad.validate()
    bad = copy.deepcopy(plan)
    bad.layers[0].groups[0].coeffs = [float("nan")]
    with pytest.raises(MoepruneError, match="non-finite"):
        bad.validate()
    bad = copy.deepcopy(plan)
    bad.layers[1].router_merge = "max"
    with pytest.raises(MoepruneError, match="router_merge"):
        bad.validate()
    with pytest.raises(MoepruneError, match="no layers"):
        Plan("manual", [], dict(MIXTRAL)).validate()


@pytest.mark.parametrize("groups,message", [
    (singletons(0, 1, 4), "divisible by n_group=2"),  # keeping 3 experts
    (singletons(0, 4), "fewer than 2"),  # one per routing group
    (singletons(0, 1, 2, 3), "routing group"),  # all from group 0
    (singletons(4, 5, 0, 1), "routing group"),  # wrong order
    ([[0, 4], [1], [5], [6]], "routing group"),  # a merge across routing groups 0 and 1
])
def test_group_limited_routing_constraints(groups, message):
    plan = plan_of(DEEPSEEK, [groups] * 2)
    with pytest.raises(MoepruneError, match=message) as info:
        plan.validate()
    assert "--flatten-groups" in str(info.value)
    plan.flatten_groups = True
    plan.validate()  # flattening lifts every group constraint


def test_budget():
    assert budget(8, 2, ratio=0.5) == 4
    assert budget(8, 2, ratio=0.0) == 8
    assert budget(8, 2, ratio=0.25) == 6
    assert budget(8, 2, experts=2) == 2
    assert budget(8, 2, experts=4, n_group=2) == 4
    assert budget(8, 2, experts=3, n_group=2, flatten_groups=True) == 3
    for kwargs, message in [
        ({"ratio": 1.0}, r"outside \[0, 1\)"),
        ({"ratio": -0.1}, r"outside \[0, 1\)"),
        ({"ratio": 0.9}, "fewer than top-k"),
        ({"experts": 1}, "fewer than top-k"),
        ({"experts": 0}, "outside"),
        ({"experts": 9}, "outside"),
        ({}, "exactly one"),
        ({"ratio": 0.5, "experts": 4}, "exactly one"),
        ({"experts": 3, "n_group": 2}, "flatten-groups"),
        ({"experts": 2, "n_group": 2}, "flatten-groups"),
    ]:
        with pytest.raises(MoepruneError, match=message):
            budget(8, 2, **kwargs)


# ---- group-limited models in memory ------------------------------------------------------------

def test_deepseek_v3_plan_that_breaks_groups_is_refused_by_surgery():
    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model.config)
    assert adapter.n_group == 2
    stats = observe(model, token_ids(2, 32), batch_size=2, probe_size=8)
    with pytest.raises(MoepruneError, match="flatten-groups"):
        api.make_plan_for(stats, "frequency", experts=3)
    plan = api.make_plan_for(stats, "frequency", experts=4)
    for lp in plan.layers:
        assert len([e for e in lp.kept if e < 4]) == 2
    bad = copy.deepcopy(plan)
    bad.layers[0].groups = [Group([0, 4], [0.5, 0.5])] + bad.layers[0].groups[1:]
    with pytest.raises(MoepruneError):
        apply_plan(copy.deepcopy(model), bad)


def test_flatten_groups_allows_any_budget_and_still_runs(checkpoint, calib_file, tmp_path):
    src = checkpoint("deepseek_v3")
    with pytest.raises(MoepruneError, match="flatten-groups"):
        api.prune(src, "frequency", tmp_path / "refused", experts=3, calib=str(calib_file), samples=4,
                  seq_len=32, progress=False)
    assert not (tmp_path / "refused").exists()
    out = api.prune(src, "frequency", tmp_path / "flat", experts=3, flatten_groups=True,
                    calib=str(calib_file), samples=4, seq_len=32, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["n_group"] == 1 and config["topk_group"] == 1 and config["n_routed_experts"] == 3
    assert Plan.load(out / "moeprune_plan.json").flatten_groups
    assert "flattened" in (out / "README.md").read_text()
    model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    model.eval()
    for block in get_adapter(model.config).moe_blocks(model).values():
        assert block.gate.num_group == 1 and block.gate.topk_group == 1
    with torch.no_grad():
        logits = model(token_ids()).logits
    assert torch.isfinite(logits).all()
    # the same through the command line flag
    assert main(["prune", str(src), "--method", "frequency", "--out", str(tmp_path / "cli"), "--experts", "3",
                 "--flatten-groups", "--calib", str(calib_file), "--samples", "4", "--seq-len", "32"]) == 0
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["n_routed_experts"]) == (1, 1, 3)


def test_deepseek_v2_group_limited_greedy_keeps_a_multiple_of_n_group():
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    adapter = get_adapter(model.config)
    assert adapter.n_group == 4 and adapter.min_experts_per_group == 1
    stats = observe(model, token_ids(2, 32), batch_size=2, probe_size=8)
    for bad in (6, 2):  # E % n_group != 0 makes group_limited_greedy misbehave silently
        with pytest.raises(MoepruneError, match="flatten-groups"):
            api.make_plan_for(stats, "frequency", experts=bad)
    plan = api.make_plan_for(stats, "frequency", experts=4)
    for lp in plan.layers:
        assert [e // 2 for e in lp.kept] == [0, 1, 2, 3]  # one expert from each routing group of two
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.config.n_routed_experts == 4 and pruned.config.n_group == 4
    with torch.no_grad():
        assert torch.isfinite(pruned(token_ids()).logits).all()
    # plain greedy DeepSeek-V2 has no group constraint
    greedy = observe(tiny_model("deepseek_v2"), token_ids(2, 32), batch_size=2, probe_size=8)
    assert api.make_plan_for(greedy, "frequency", experts=6).num_experts_out == 6


def test_flatten_groups_merging_across_groups_in_memory():
    model = tiny_model("deepseek_v3")
    plan = plan_of(DEEPSEEK, [[[0, 4], [1, 5], [2]]] * 2, flatten_groups=True)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert (pruned.config.n_group == 1 and pruned.config.topk_group == 1
            and pruned.config.n_routed_experts == 3)
    with torch.no_grad():
        assert torch.isfinite(pruned(token_ids()).logits).all()
