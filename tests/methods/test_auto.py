"""`auto`: per layer, the candidate whose held-out block output is closest to the original's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import observed

from moeprune.api import prune as prune_model
from moeprune.arch.tiny import tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods import make_plan_for
from moeprune.methods.auto import AutoConfig, _planning_stats, _probe_half
from moeprune.methods.registry import PlanRequest, make_plan
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Plan

CANDIDATES = "frequency,reap,naee,msmoe"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_each_layer_takes_the_candidate_with_the_lowest_held_out_error(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    stats = observed(model, 256)
    weights = ModelWeights(model)
    plan = make_plan_for(stats, "auto", ratio=0.5, weights=weights, options={"candidates": CANDIDATES})
    assert plan.method == "auto"
    for lp in plan.layers:
        errors = lp.notes["errors"]
        assert set(errors) == set(CANDIDATES.split(","))
        assert errors[lp.notes["chosen"]] == min(errors.values())
        # the layer is the chosen method's plan, made on the even half of the probe
        ls = stats.layers[lp.layer]
        one = PlanRequest(_planning_stats(stats, lp.layer), plan.num_experts_out, weights=weights)
        expected = make_plan(lp.notes["chosen"], one).layers[0]
        assert [g.members for g in lp.groups] == [g.members for g in expected.groups]
        # the recorded error is the block's on the odd half
        access = weights.layer(lp.layer)
        x = ls.probe.inputs[_probe_half(ls, 1)]
        Z = access.block_output(x).double()
        got = access.block_output(x, dataclasses.replace(lp, notes={})).double()
        error = float(((Z - got) ** 2).sum() / (Z**2).sum())
        assert error == pytest.approx(errors[lp.notes["chosen"]], rel=1e-4)


def test_novice_format_makes_every_layer_a_mone_layer():
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    stats = observed(model, 256)
    plan = make_plan_for(stats, "auto", ratio=0.5, weights=ModelWeights(model),
                         options={"candidates": "frequency,reap", "format": "novices"})
    for lp in plan.layers:
        assert "mone" in lp.notes["errors"]
        assert lp.is_pruning and sorted(lp.kept + lp.novices) == list(range(lp.num_experts_in))
    plan.validate()
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_the_default_candidates_follow_the_format():
    assert AutoConfig().names == ["frequency", "ean", "reap", "naee", "ream", "msmoe"]
    assert AutoConfig(format="novices").names == ["frequency", "ean", "reap", "naee"]  # no merges
    assert AutoConfig(candidates="reap,ean", format="novices").names == ["reap", "ean"]


def test_options_are_refused_in_one_line():
    for options, message in [({"candidates": "reap,nonsense"}, "not a list of known methods"),
                             ({"candidates": " , "}, "names no method"),
                             ({"candidates": "reap,msmoe", "format": "novices"},
                              "not usable with format=novices"),
                             ({"format": "mixed"}, "not a known choice")]:
        with pytest.raises(MoepruneError, match=message) as e:
            AutoConfig(**options)
        assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stock", "novices"])
def test_auto_prune_with_compensation_writes_a_checkpoint_that_loads(fmt, checkpoint, calib_file, tmp_path):
    import moeprune
    from moeprune.store.checkpoint import load_model

    out = prune_model(checkpoint("mixtral"), "auto", tmp_path / "o", ratio=0.5, calib=str(calib_file),
                      samples=12, seq_len=32, batch_size=4, probe_size=64, progress=False,
                      options={"candidates": "frequency,reap", "format": fmt},
                      compensate="down" if fmt == "stock" else "down+novices")
    plan = Plan.load(out / "moeprune_plan.json")
    assert all(lp.notes["chosen"] in ("frequency", "reap", "mone") for lp in plan.layers)
    assert all("compensation" in lp.notes for lp in plan.layers)
    model = moeprune.from_pretrained(out) if fmt == "novices" else load_model(out)
    assert torch.isfinite(model(torch.randint(3, 400, (2, 16))).logits).all()
