"""Score-based methods on hand-built statistics, the registry, and `moeprune methods`."""

from __future__ import annotations

import math

import pytest
import torch

from moeprune import cli
from moeprune.api import make_plan_for
from moeprune.errors import MoepruneError
from moeprune.methods import METHODS
from moeprune.observe import ExpertStats, LayerStats, Probe, Stats

E, H = 8, 4

# One layer's statistics, chosen so that every score ranks the experts differently.
COUNT = [10, 50, 30, 5, 40, 20, 60, 1]
GATE_SUM = [9, 2, 8, 7, 1, 6, 3, 5]
EAN_SUM = [1, 2, 3, 4, 5, 6, 7, 8]
REAP_MEAN = [0.8, 0.1, 0.2, 0.9, 0.3, 0.7, 0.05, 0.6]  # reap_sum / count
EXPECTED_TOP4 = {
    "frequency": [1, 2, 4, 6],  # 60, 50, 40, 30
    "routing_score": [0, 2, 3, 5],  # 9, 8, 7, 6
    "ean": [4, 5, 6, 7],
    "reap": [0, 3, 5, 7],  # 0.9, 0.8, 0.7, 0.6; the raw reap_sum would give [0, 2, 4, 5]
}


def expert_stats(count, gate_sum, ean_sum, reap_mean) -> ExpertStats:
    st = ExpertStats(len(count), H)
    st.count = torch.tensor(count, dtype=torch.float64)
    st.gate_sum = torch.tensor(gate_sum, dtype=torch.float64)
    st.ean_sum = torch.tensor(ean_sum, dtype=torch.float64)
    st.reap_sum = st.count * torch.tensor(reap_mean, dtype=torch.float64)
    return st


def synthetic_stats(per_layer: dict[int, ExpertStats], n_group: int = 1) -> Stats:
    empty = Probe(torch.zeros(0, dtype=torch.long), torch.zeros(0, H), torch.zeros(0, E))
    model = {"model_type": "deepseek_v3" if n_group > 1 else "mixtral", "source": None, "num_experts": E,
             "top_k": 2, "n_group": n_group, "min_experts_per_group": 2, "hidden_size": H,
             "moe_layers": sorted(per_layer)}
    return Stats(model=model, calibration={"tokens": 100, "seed": 0},
                 layers={i: LayerStats(i, st, empty) for i, st in per_layer.items()})


def _reversed_stats() -> ExpertStats:
    return expert_stats(COUNT[::-1], GATE_SUM[::-1], EAN_SUM[::-1], REAP_MEAN[::-1])


@pytest.mark.parametrize("method", sorted(EXPECTED_TOP4))
def test_score_methods_keep_the_expected_experts(method):
    stats = synthetic_stats({1: expert_stats(COUNT, GATE_SUM, EAN_SUM, REAP_MEAN), 2: _reversed_stats()})
    plan = make_plan_for(stats, method, experts=4)
    assert plan.method == method and plan.num_experts_out == 4
    assert plan.layer(1).kept == EXPECTED_TOP4[method]
    assert plan.layer(2).kept == sorted(E - 1 - e for e in EXPECTED_TOP4[method])
    for lp in plan.layers:
        assert lp.is_pruning and lp.num_experts_in == E
        assert [g.members[0] for g in lp.groups] == lp.kept  # output experts stay in input order
        assert lp.dropped == [e for e in range(E) if e not in lp.kept]
    # by ratio: 0.5 of 8 removed is the same budget
    assert make_plan_for(stats, method, ratio=0.5).layer(1).kept == EXPECTED_TOP4[method]
    assert len(make_plan_for(stats, method, ratio=0.25).layer(1).kept) == 6


@pytest.mark.parametrize("keep", [2, 3, 5, 7, 8])
def test_frequency_keeps_top_r_for_any_budget(keep):
    stats = synthetic_stats({0: expert_stats(COUNT, GATE_SUM, EAN_SUM, REAP_MEAN)})
    order = sorted(range(E), key=lambda e: -COUNT[e])
    assert make_plan_for(stats, "frequency", experts=keep).layer(0).kept == sorted(order[:keep])


def test_ties_break_towards_lower_ids_and_unused_experts_score_zero():
    flat = expert_stats([5] * E, [1.0] * E, [2.0] * E, [0.5] * E)
    assert make_plan_for(synthetic_stats({0: flat}), "frequency", experts=4).layer(0).kept == [0, 1, 2, 3]
    unused = expert_stats([0, 3, 0, 3, 3, 0, 3, 3], [0, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1, 1],
                          [0, 0.2, 0, 0.1, 0.3, 0, 0.4, 0.5])
    plan = make_plan_for(synthetic_stats({0: unused}), "reap", experts=4)
    assert plan.layer(0).kept == [1, 4, 6, 7]
    assert all(math.isfinite(s) for s in plan.layer(0).notes["scores"])  # no NaN for never-routed experts


@pytest.mark.parametrize("method", sorted(EXPECTED_TOP4))
def test_group_limited_selection_keeps_the_same_number_per_routing_group(method):
    # group 0 = experts 0-3 scores low everywhere, group 1 = experts 4-7 high: a global top-4 would
    # take all of group 1; within-group selection takes the best two of each group
    low, high = [1, 2, 3, 4], [100, 90, 80, 70]
    st = expert_stats(low + high, low + high, low + high, [0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6])
    stats = synthetic_stats({1: st, 2: st}, n_group=2)
    plan = make_plan_for(stats, method, experts=4)
    assert plan.layer(1).kept == [2, 3, 4, 5]
    plan.validate()
    flat = make_plan_for(stats, method, experts=4, flatten_groups=True)
    assert flat.flatten_groups and flat.layer(1).kept == [4, 5, 6, 7]
    with pytest.raises(MoepruneError, match="flatten-groups"):
        make_plan_for(stats, method, experts=3)


def test_random_is_seeded_and_deterministic():
    a = synthetic_stats({0: expert_stats(COUNT, GATE_SUM, EAN_SUM, REAP_MEAN), 1: _reversed_stats(),
                         2: _reversed_stats()})
    b = synthetic_stats({0: _reversed_stats(), 1: _reversed_stats(), 2: _reversed_stats()})
    first = make_plan_for(a, "random", experts=4, options={"seed": 3})
    assert first.to_dict() == make_plan_for(a, "random", experts=4, options={"seed": 3}).to_dict()
    # the choice does not depend on the statistics
    assert [lp.kept for lp in first.layers] == [lp.kept for lp in make_plan_for(b, "random", experts=4,
                                                                                 options={"seed": 3}).layers]
    assert first.method_config == {"seed": 3}
    seeds = {tuple(make_plan_for(a, "random", experts=4, options={"seed": s}).layer(0).kept)
             for s in range(6)}
    assert len(seeds) > 1
    assert len({tuple(lp.kept) for lp in first.layers}) > 1  # per-layer seeds differ
    for lp in first.layers:
        assert len(lp.kept) == 4 and all(0 <= e < E for e in lp.kept)


def test_method_options_are_checked():
    stats = synthetic_stats({0: expert_stats(COUNT, GATE_SUM, EAN_SUM, REAP_MEAN)})
    with pytest.raises(MoepruneError, match="no option"):
        make_plan_for(stats, "frequency", experts=4, options={"seed": 1})
    with pytest.raises(MoepruneError, match="unknown method"):
        make_plan_for(stats, "no-such-method", experts=4)


def test_registry_has_the_score_methods_with_references():
    assert {"random", "frequency", "routing_score", "ean", "reap"} <= set(METHODS)
    for name, spec in METHODS.items():
        assert spec.name == name and spec.paper and spec.summary
    assert METHODS["random"].needs_calibration is False
    assert "2510.13999" in METHODS["reap"].paper


def test_methods_cli_lists_every_registered_method(capsys, monkeypatch):
    # an 80-column console, as when the output is piped or the terminal is small
    monkeypatch.setattr(cli.out, "width", 80)
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert name in text, f"method {name!r} is not readable in `moeprune methods`"
