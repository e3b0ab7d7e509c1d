"""Permutation alignment as an option of every weight-space merge (DEK, HC-SMoE; UNCURL, M-SMoE already).

`align=true` permutes each merged group's members to its most-routed member (`methods.alignment.
group_permutations`) before the weighted sum; off, plans are the unaligned ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from helpers import COUNT_FIELD, token_ids

from moeprune import api
from moeprune.api import empty_stats, make_plan_for
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.cli import _parse_options
from moeprune.errors import MoepruneError
from moeprune.methods.alignment import reference_member
from moeprune.methods.registry import get_method
from moeprune.methods.uncurl import most_used
from moeprune.observe import observe
from moeprune.pipeline.access import ModelWeights
from moeprune.plan import Plan
from moeprune.surgery import apply_plan
from moeprune.surgery.alignment import permute_expert_hidden

MERGES = ["dek", "hc_smoe", "msmoe", "uncurl"]


def _ids(seed: int = 0, batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


FIELDS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def _weights(ew) -> list[torch.Tensor | None]:
    return [None if getattr(ew, f) is None else getattr(ew, f).detach().clone() for f in FIELDS]


def _width(model) -> int:
    adapter = get_adapter(model.config)
    block = next(iter(adapter.moe_blocks(model).values()))
    return adapter.expert_weights(block, 0).up.shape[0]


# ---- the option ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", MERGES)
def test_every_weight_space_merge_names_the_option_align_a_flag(method):
    spec = get_method(method)
    assert isinstance(spec.default_config().align, bool)
    assert spec.default_config(align=True).align is True and spec.default_config(align=False).align is False


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("bad", ["yes", "weight", 1, None])
def test_bad_align_values_are_refused_in_one_line(method, bad):
    with pytest.raises(MoepruneError, match=f"{method} option align=.* is not true or false") as err:
        get_method(method).default_config(align=bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", MERGES)
def test_the_command_line_reads_align_as_a_flag(method):
    assert _parse_options(method, ["align=true"]) == {"align": True}
    assert _parse_options(method, ["align=off"]) == {"align": False}
    with pytest.raises(MoepruneError, match="align is true or false"):
        _parse_options(method, ["align=weight"])


def test_defaults_are_the_papers_readings():
    # DEK and HC-SMoE average unaligned in their papers; UNCURL and M-SMoE align
    assert get_method("dek").default_config().align is False
    assert get_method("hc_smoe").default_config().align is False
    assert get_method("uncurl").default_config().align is True
    assert get_method("msmoe").default_config().align is True


def test_every_merge_picks_its_reference_by_one_rule():
    # UNCURL and M-SMoE align to the most-used member; DEK and HC-SMoE use the same rule
    counts = torch.tensor([3.0, 7.0, 7.0, 0.0, 1.0, 7.0])
    for members in ([0, 1, 2], [2, 5, 1], [3, 4], [3], [0, 4, 3]):
        assert reference_member(members, counts) == most_used(members, counts)
    assert reference_member([5, 2, 1], counts) == 1  # ties: the lowest id


@pytest.mark.parametrize("method", ["dek", "hc_smoe"])
def test_align_is_refused_where_experts_cannot_be_permuted(method):
    adapter = get_adapter(tf.DbrxConfig())  # flat w1/v1/w2 experts; a config only, no weights built
    adapter.check_method(method, get_method(method).default_config())
    with pytest.raises(MoepruneError, match="align=false"):
        adapter.check_method(method, get_method(method).default_config(align=True))


# ---- aligned plans -------------------------------------------------------------------------------

CALIBRATED = [("dek", {}), ("dek", {"coefficients": "frequency"}), ("dek", {"coefficients": "learned",
              "learn_steps": 3}), ("hc_smoe", {}), ("hc_smoe", {"metric": "cosine"})]


@pytest.fixture(scope="module")
def observed_models():
    out = {}
    for family in ("mixtral", "deepseek_v3"):
        model = tiny_model(family)
        out[family] = (model, observe(model, _ids(), batch_size=2, probe_size=64))
    return out


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("method,options", CALIBRATED)
def test_aligned_plans_carry_valid_permutations_and_keep_the_unaligned_groups(method, options, family,
                                                                            observed_models):
    model, stats = observed_models[family]
    w = ModelWeights(model)
    I = _width(model)
    off = make_plan_for(stats, method, experts=4, weights=w, options=options)
    on = make_plan_for(stats, method, experts=4, weights=w, options={**options, "align": True})
    assert on.method_config["align"] is True and off.method_config["align"] is False
    for lo, la in zip(off.layers, on.layers):
        counts = stats.layers[la.layer].experts.count
        assert [g.members for g in la.groups] == [g.members for g in lo.groups]  # grouping is order-invariant
        if options.get("coefficients") != "learned":
            assert [g.coeffs for g in la.groups] == [g.coeffs for g in lo.groups]
        assert la.notes["aligned"] is True and "aligned" not in lo.notes and "references" not in lo.notes
        assert any(len(g.members) > 1 for g in la.groups)
        for g, ref in zip(la.groups, la.notes["references"]):
            assert ref == reference_member(g.members, counts) and ref in g.members
            if len(g.members) == 1:
                assert g.perms is None
                continue
            assert len(g.perms) == len(g.members)
            for q in g.perms:
                assert sorted(q) == list(range(I))  # a permutation of the hidden units
            assert g.perms[g.members.index(ref)] == list(range(I))  # the reference is not moved
            ranked = max(g.members, key=lambda e: float(counts[e]))
            assert float(counts[ref]) == float(counts[ranked])  # the most-routed member
        for g in lo.groups:
            assert g.perms is None
    assert any(q != list(range(I)) for lp in on.layers for g in lp.groups for q in (g.perms or []))


def test_aligned_plan_without_calibration_references_the_lowest_id():
    model = tiny_model("qwen2_moe")
    plan = make_plan_for(empty_stats(model), "dek", experts=4, weights=ModelWeights(model),
                         options={"representation": "weight", "align": True})
    for lp in plan.layers:
        assert lp.notes["references"] == [g.members[0] for g in lp.groups]  # members sorted: the lowest id
        assert all(g.perms is not None for g in lp.groups if len(g.members) > 1)


def test_align_off_leaves_plans_as_they_were(observed_models):
    """Off is the default, and the JSON of the layers carries nothing of alignment."""
    model, stats = observed_models["mixtral"]
    w = ModelWeights(model)
    for method in ("dek", "hc_smoe"):
        default = make_plan_for(stats, method, experts=4, weights=w).to_dict()
        off = make_plan_for(stats, method, experts=4, weights=w, options={"align": False}).to_dict()
        assert default == off
        for lp in off["layers"]:
            assert all("perms" not in g for g in lp["groups"])
            assert not {"aligned", "references"} & set(lp["notes"])


# ---- two experts that are permutations of each other --------------------------------------------

def _twin(model, a: int, b: int, seed: int = 3) -> None:
    """Make expert b expert a with its hidden units shuffled, router rows (and biases) equal to a's."""
    adapter = get_adapter(model.config)
    with torch.no_grad():
        for block in adapter.moe_blocks(model).values():
            params = {k: v.detach().clone() for k, v in adapter.expert_parameters(block).items()}
            for t in params.values():
                t[b] = t[a]
            I = adapter.expert_weights(block, a).up.shape[0]
            permute_expert_hidden(adapter, params, b, torch.randperm(I, generator=torch.Generator()
                                                                      .manual_seed(seed)))
            for name, value in params.items():
                getattr(adapter.experts(block), name).copy_(value)
            for owner, name, axis in adapter.router_expert_tensors(block):
                t = getattr(owner, name)
                t.select(axis, b).copy_(t.select(axis, a))


TWIN_CASES = [("dek", {"representation": "weight"}), ("dek", {"representation": "data"}),
              ("dek", {"representation": "weight", "coefficients": "learned", "learn_steps": 3}),
              ("hc_smoe", {"coefficients": "uniform"})]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # fused; transposed, interleaved, biases
@pytest.mark.parametrize("method,options", TWIN_CASES)
def test_aligned_merge_of_permuted_twins_reproduces_the_expert_and_the_model(method, options, family):
    # top-1 with the twins' router rows equal: a token routed to either gets weight 1 on it before and on
    # the merged expert after, so an exact merge leaves the model's function unchanged
    model = tiny_model(family, top_k=1)
    _twin(model, 1, 2)
    adapter = get_adapter(model.config)
    E = adapter.num_experts
    stats = observe(model, _ids(), batch_size=2, probe_size=64)
    w = ModelWeights(model)
    ids = token_ids()
    with torch.no_grad():
        want = model(ids).logits
    originals = {i: _weights(adapter.expert_weights(b, 1)) for i, b in adapter.moe_blocks(model).items()}
    for align in (True, False):
        plan = make_plan_for(stats, method, experts=E - 1, weights=w, options={**options, "align": align})
        for lp in plan.layers:
            assert [g.members for g in lp.groups if len(g.members) > 1] == [[1, 2]]
            x = stats.layers[lp.layer].probe.inputs
            acc = w.layer(lp.layer)
            err = (acc.block_output(x, lp) - acc.block_output(x)).abs().max()  # through the plan
            assert (err < 1e-5) if align else (err > 1e-3)
        merged = apply_plan(copy.deepcopy(model), plan)  # through surgery
        for i, block in adapter.moe_blocks(merged).items():
            ew = _weights(adapter.expert_weights(block, 1))  # output expert 1 is the merged pair
            gap = max(float((a - b).abs().max()) for a, b in zip(ew, originals[i]) if b is not None)
            assert (gap < 1e-6) if align else (gap > 1e-3)
        with torch.no_grad():
            got = merged(ids).logits
        if align:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        else:
            assert (got - want).abs().max() > 1e-4


# ---- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,options,calibrated", [("dek", {"representation": "weight"}, False),
                                                       ("dek", {"representation": "data"}, True),
                                                       ("hc_smoe", {}, True)])
@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_aligned_prune_writes_a_checkpoint_that_reloads(method, options, calibrated, family, checkpoint,
                                                        calib_file, tmp_path):
    src = checkpoint(family)
    calib = dict(calib=str(calib_file), samples=4, seq_len=32, probe_size=64) if calibrated else {}
    out = api.prune(src, method, tmp_path / "out", experts=4, progress=False,
                    options={**options, "align": True}, **calib)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.method_config["align"] is True
    merged = [g for lp in plan.layers for g in lp.groups if len(g.members) > 1]
    assert merged and all(g.perms is not None and len(g.perms) == len(g.members) for g in merged)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert getattr(reloaded.config, COUNT_FIELD[family]) == 4
    in_memory = apply_plan(tf.AutoModelForCausalLM.from_pretrained(str(src)).eval(), plan)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-5)
