"""Inputs are validated when they are loaded: plans (schema, coefficients, structure against model
facts), stats directories and method options each fail with one MoepruneError line naming what is
wrong, before any model is loaded or calibration runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
from helpers import token_ids

from moeprune.arch.tiny import tiny_model
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.methods import PlanRequest, make_plan
from moeprune.observe import observe
from moeprune.observe.stats import LayerStats, Stats
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Group, LayerPlan, Plan

E, H, I = 8, 16, 4
MODEL = {"model_type": "mixtral", "num_experts": E, "top_k": 2, "n_group": 1, "min_experts_per_group": 2,
         "hidden_size": H, "moe_layers": [0, 1, 2]}


def good_plan(**kw) -> Plan:
    """Three MoE layers, each merging [0, 1] (aligned, perms of width I) and keeping 2..5."""
    perm = [list(range(I)), [1, 0, 3, 2]]
    kept = [Group([e], [1.0]) for e in range(2, 6)]
    layers = [LayerPlan(i, E, [Group([0, 1], [0.25, 0.75], copy.deepcopy(perm)), *copy.deepcopy(kept)],
                        novices=[], notes={"why": "test"}) for i in (0, 1, 2)]
    return Plan(method="manual", layers=layers, model=dict(MODEL), method_config={"seed": 0}, **kw)


def good_dict() -> dict:
    return json.loads(json.dumps(good_plan().to_dict()))


def _set(d: dict, path: str, value) -> dict:
    """d with the field at `path` ("layers.2.groups.0.coeffs.1") set to value (deleted for DELETE)."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = d
    for k in keys[:-1]:
        target = target[k]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


DELETE = object()


# ---- 1. the plan schema -----------------------------------------------------------------------------

@pytest.mark.parametrize("path,value,fragments", [
    ("layers.2.groups.0.coeffs.1", "0.75", ["layers[2].groups[0].coeffs[1]", "a number", 'string "0.75"']),
    ("layers.0.groups.1.members.0", "2", ["layers[0].groups[1].members[0]", "an integer", "string"]),
    ("layers.0.groups.1.members.0", 2.0, ["layers[0].groups[1].members[0]", "an integer", "2.0"]),
    ("layers.0.groups.1.members.0", True, ["layers[0].groups[1].members[0]", "an integer", "true"]),
    ("layers.1.groups.0.perms.1", "1032", ["layers[1].groups[0].perms[1]", "a list", "string"]),
    ("layers.1.groups.0.perms.1.2", 3.5, ["layers[1].groups[0].perms[1][2]", "an integer"]),
    ("layers.1.groups.0.perms", "none", ["layers[1].groups[0].perms", "a list"]),
    ("layers", {"0": []}, ["layers must be a list", "an object"]),
    ("layers.0", [0, 8], ["layers[0] must be an object", "a list"]),
    ("layers.1.groups", None, ["layers[1].groups", "a list", "null"]),
    ("flatten_groups", "yes", ["flatten_groups", "true or false", 'string "yes"']),
    ("flatten_groups", 1, ["flatten_groups", "true or false", "number 1"]),
    ("normalise", "false", ["normalise", "true or false"]),
    ("layers.0.layer", "0", ["layers[0].layer", "an integer"]),
    ("layers.0.layer", True, ["layers[0].layer", "an integer", "true"]),
    ("layers.0.num_experts_in", 8.0, ["layers[0].num_experts_in", "an integer"]),
    ("layers.0.notes", ["why"], ["layers[0].notes", "an object"]),
    ("layers.0.novices", 3, ["layers[0].novices", "a list"]),
    ("layers.0.novices", [6.0], ["layers[0].novices[0]", "an integer"]),
    ("layers.0.router_merge", 1, ["layers[0].router_merge", "a string"]),
    ("model", "mixtral", ["model must be an object", "string"]),
    ("model.num_experts", "8", ["model.num_experts", "an integer"]),
    ("model.top_k", True, ["model.top_k", "an integer"]),
    ("model.moe_layers", [0, "1"], ["model.moe_layers[1]", "an integer"]),
    ("method", 3, ["method must be a string"]),
    ("method_config", [], ["method_config must be an object"]),
    ("calibration", "calib.txt", ["calibration must be an object"]),
    ("version", True, ["version must be an integer", "true"]),
    ("version", "1", ["version must be an integer"]),
    ("num_experts_out", "5", ["num_experts_out must be an integer"]),
    ("layers.0.groups.0.coeffs", 0.5, ["layers[0].groups[0].coeffs must be a list"]),
    ("layers", DELETE, ["lacks", "layers"]),
    ("model", DELETE, ["lacks", "model"]),
    ("model.top_k", DELETE, ["model lacks", "top_k"]),
    ("layers.1.num_experts_in", DELETE, ["layers[1] lacks", "num_experts_in"]),
    ("layers.1.groups.2.coeffs", DELETE, ["layers[1].groups[2] lacks", "coeffs"]),
    ("normalize", False, ["unknown field", "'normalize'"]),  # a misspelling would be ignored silently
    ("layers.0.groups.0.coef", [1.0], ["layers[0].groups[0] has unknown field", "'coef'"]),
])
def test_plan_schema_names_the_field_and_the_expected_type(tmp_path, path, value, fragments):
    path_file = tmp_path / "plan.json"
    path_file.write_text(json.dumps(_set(good_dict(), path, value)))
    with pytest.raises(MoepruneError) as info:
        Plan.load(path_file)
    message = str(info.value)
    assert message.startswith(f"{path_file}: ")  # the file is named
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text,fragment", [
    ("[1, 2]", "the plan must be an object, not a list"),
    ('"plan"', "must be an object"),
    ("null", "must be an object, not null"),
    ("{not json", "not valid JSON"),
    ('{"version": 99, "method": "m", "layers": [], "model": {"num_experts": 8, "top_k": 2}}', "version 99"),
])
def test_plan_files_that_are_not_plans(tmp_path, text, fragment):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(MoepruneError, match=fragment):
        Plan.load(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(MoepruneError, match="not UTF-8"):
        Plan.load(path)


def test_plan_from_dict_without_a_file_names_the_field():
    with pytest.raises(MoepruneError, match=r"^plan: layers\[0\]\.groups\[0\]\.members\[1\] must be an int"):
        Plan.from_dict(_set(good_dict(), "layers.0.groups.0.members.1", [1]))


def test_flatten_groups_string_no_longer_adds_group_fields(tmp_path):
    """`"flatten_groups": "yes"` used to be truthy and flatten a Mixtral config; now it is refused."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_set(good_dict(), "flatten_groups", "no")))
    with pytest.raises(MoepruneError, match="flatten_groups must be true or false"):
        Plan.load(path)


def test_a_valid_plan_round_trips_and_old_plans_default_to_normalised(tmp_path):
    plan = good_plan()
    plan.validate()
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["normalise"] is True
    assert Plan.load(tmp_path / "plan.json") == plan
    old = good_dict()
    del old["normalise"]
    assert Plan.from_dict(old).normalise is True
    free = good_plan(normalise=False)
    free.save(tmp_path / "free.json")
    assert Plan.load(tmp_path / "free.json").normalise is False


def test_bad_plan_via_cli_is_one_line_before_the_model(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_set(good_dict(), "layers.2.groups.0.coeffs.1", "0.75")))
    # the model directory does not exist: the plan must be refused first
    assert main(["apply", str(tmp_path / "no-model"), str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "layers[2].groups[0].coeffs[1]" in lines[0], lines
    assert not (tmp_path / "out").exists()


# ---- 2. coefficients ---------------------------------------------------------------------------------

def _with_coeffs(coeffs, **kw) -> Plan:
    plan = good_plan(**kw)
    plan.layers[1].groups[0].coeffs = list(coeffs)
    return plan


@pytest.mark.parametrize("coeffs,fragment", [
    ([-0.5, 1.5], "negative"),
    ([0.5, 0.6], "sum to 1.1"),
    ([0.2, 0.2], "sum to 0.4"),
    ([1e30, -1e30 + 1], "negative"),
    ([1e30, 1.0], r"sum to 1e\+30"),
    ([math.nan, 0.5], "non-finite"),
    ([math.inf, 0.0], "non-finite"),
])
def test_coefficients_must_be_a_weighted_average(coeffs, fragment):
    with pytest.raises(MoepruneError, match=fragment) as info:
        _with_coeffs(coeffs).validate()
    assert "layer 1" in str(info.value)
    if fragment != "non-finite":
        assert '"normalise": false' in str(info.value)  # says how to mean otherwise


def test_coefficients_within_rounding_of_one_pass():
    _with_coeffs([1 / 3, 2 / 3]).validate()
    _with_coeffs([0.25 + 4e-5, 0.75]).validate()
    with pytest.raises(MoepruneError, match="sum to"):
        _with_coeffs([0.25 + 3e-4, 0.75]).validate()


def test_normalise_false_allows_other_sums_but_not_huge_or_non_finite():
    _with_coeffs([1.5, -0.5], normalise=False).validate()
    _with_coeffs([2.0, 2.0], normalise=False).validate()
    for coeffs, fragment in [([1e30, 0.0], "beyond"), ([-2e3, 1.0], "beyond"),
                             ([math.nan, 1.0], "non-finite")]:
        with pytest.raises(MoepruneError, match=fragment):
            _with_coeffs(coeffs, normalise=False).validate()


def test_methods_producing_coefficients_make_plans_that_pass():
    """dek (uniform, learned), router_merge=sum, hc_smoe, uncurl, msmoe: real plans validate."""
    model = tiny_model("qwen3_moe")
    stats = observe(model, token_ids(2, 32), batch_size=2, probe_size=16)
    weights = ModelWeights(model)
    cases = [("dek", {}), ("dek", {"coefficients": "learned", "learn_steps": 3, "router_merge": "sum"}),
             ("dek", {"coefficients": "frequency", "representation": "weight"}), ("hc_smoe", {}),
             ("uncurl", {}), ("msmoe", {})]
    for name, options in cases:
        plan = make_plan(name, PlanRequest(stats, 5, weights=weights), **options)
        assert plan.normalise is True
        merged = [g for lp in plan.layers for g in lp.groups if len(g.members) > 1]
        assert merged, name
        for g in merged:
            assert abs(sum(g.coeffs) - 1) < 1e-6 and min(g.coeffs) >= 0, (name, g)


# ---- 3. structure against the model's facts -----------------------------------------------------------

def test_a_layer_listed_twice_is_refused():
    plan = good_plan()
    plan.layers[2] = copy.deepcopy(plan.layers[1])
    with pytest.raises(MoepruneError, match=r"layer\(s\) \[1\] more than once"):
        plan.validate()


def test_every_moe_layer_of_the_model_needs_an_entry():
    plan = good_plan()
    plan.layers = plan.layers[:2]
    plan.model["moe_layers"] = [0, 1]
    plan.validate()  # without facts: consistent with itself
    with pytest.raises(MoepruneError, match=r"no entry for MoE layer\(s\) \[2\].*another model shape"):
        plan.validate({**MODEL, "moe_layers": [0, 1, 2]})
    with pytest.raises(MoepruneError, match="not an MoE layer"):
        good_plan().validate({**MODEL, "moe_layers": [0, 1]})


def test_permutation_width_must_match_the_models_experts():
    plan = good_plan()
    plan.validate({**MODEL, "expert_intermediate_size": I})
    plan.validate({**MODEL, "expert_intermediate_size": None})  # unknown width: no check
    with pytest.raises(MoepruneError, match=f"has {I} hidden units, but the model's experts have 8"):
        plan.validate({**MODEL, "expert_intermediate_size": 8})


def test_expert_count_messages_say_which_side_has_which():
    plan = good_plan()
    with pytest.raises(MoepruneError, match="made for 8 experts per layer, but the model has 16"):
        plan.validate({**MODEL, "num_experts": 16})
    inconsistent = good_plan()
    inconsistent.model["num_experts"] = 16
    with pytest.raises(MoepruneError, match="num_experts_in=8, but its model facts say num_experts=16"):
        inconsistent.validate()


def test_statistics_of_another_model_are_named_against_the_weights():
    model = tiny_model("qwen3_moe")  # 8 experts
    weights = ModelWeights(model)
    H_model = model.config.hidden_size
    layers = {i: LayerStats.empty(i, 6, H_model) for i in weights.layers()}
    stats = Stats(model={"num_experts": 6, "top_k": 2, "moe_layers": sorted(layers)}, calibration={},
                  layers=layers)
    with pytest.raises(MoepruneError, match="statistics have 6 experts in layer .*, but the model has 8"):
        make_plan("dek", PlanRequest(stats, 4, weights=weights), representation="weight")
    layers = {i: LayerStats.empty(i, 8, H_model) for i in [*weights.layers(), 99]}
    stats = Stats(model={"num_experts": 8, "top_k": 2}, calibration={}, layers=layers)
    with pytest.raises(MoepruneError, match=r"MoE layer\(s\) \[99\] that the model does not"):
        make_plan("dek", PlanRequest(stats, 4, weights=weights), representation="weight")
