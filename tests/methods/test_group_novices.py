"""MoNE novices on group-limited routers (DeepSeek-V3/V3.2, GLM, Kimi with n_group > 1), no --flatten-groups.

The router keeps all E rows, so every token picks exactly the experts it picked before: kept experts compute
as before, novices give gate x vector. The novice checkpoint reloads exactly; its stock export keeps
group-limited routing when every routing group kept the same number, and otherwise is refused in one line
or flattened on request.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

import moeprune
from moeprune import api, compat
from moeprune.arch import get_adapter
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.methods import make_plan_for
from moeprune.methods.mone import novice_vectors
from moeprune.methods.registry import PlanRequest, make_plan
from moeprune.observe import observe
from moeprune.plan import Group, LayerPlan, Plan, budget
from moeprune.store.checkpoint import export_stock, parameter_counts, save_checkpoint, stock_group_problem
from moeprune.surgery import apply_plan

# model_type -> config overrides giving 8 experts in 2 routing groups, one of which a token may use (the
# shrunk configs of the others already route so): DeepSeek-V3 and V3.2, GLM-4.5 (glm4_moe) and GLM-5
# (glm_moe_dsa), Kimi-K2.5 (a DeepSeek-V3 text model in a vision-language wrapper) and Kimi-Linear
GROUPED = {
    "deepseek_v3": {},
    "glm4_moe": {"n_group": 2, "topk_group": 1},
    "glm_moe_dsa": {},
    "kimi_k25": {},
    "kimi_linear": {"n_group": 2, "topk_group": 1},
    "deepseek_v32": {},
}
KEEP = 3  # odd: no pruning method could keep it with 2 routing groups


def _ids(seed: int = 0, batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def _routing_of(adapter, block, x: torch.Tensor):
    """(router ids [T, K], gates [T, K], experts input [T, H], experts output [T, H]) of `block` on x."""
    seen = {}

    def before(module, args):
        seen["x"], seen["ids"], seen["gates"] = args[0], args[1], args[2]

    def after(module, args, out):
        seen["out"] = out

    ex = adapter.experts(block)
    handles = [ex.register_forward_pre_hook(before), ex.register_forward_hook(after)]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for h in handles:
            h.remove()
    return seen["ids"], seen["gates"], seen["x"], seen["out"]


def _mone(family: str, keep: int = KEEP, **options):
    model = tiny_model(family, **GROUPED[family])
    adapter = get_adapter(model.config)
    assert adapter.n_group == 2 and adapter.min_experts_per_group == 2  # the premise: grouped routing
    stats = observe(model, _ids(), batch_size=2, probe_size=32)
    plan = make_plan_for(stats, "mone", experts=keep, options=options)
    pruned = apply_plan(copy.deepcopy(model), plan, stats=stats)
    return model, stats, plan, pruned


# ---- planning --------------------------------------------------------------------------------------
def test_budget_leaves_the_count_free_only_for_novices():
    with pytest.raises(MoepruneError, match="flatten-groups") as e:
        budget(8, 2, experts=3, n_group=2, min_per_group=2)
    assert "\n" not in str(e.value)
    assert budget(8, 2, experts=3, n_group=2, min_per_group=2, groups_unchanged=True) == 3
    with pytest.raises(MoepruneError, match="top-k"):  # the router still picks top-k experts
        budget(8, 2, experts=1, n_group=2, groups_unchanged=True)


def test_plan_with_novices_skips_the_group_checks_but_not_the_novice_ones():
    E = 8
    layers = [LayerPlan(1, E, [Group([e], [1.0]) for e in (0, 1, 5)], novices=[2, 3, 4, 6, 7])]
    model = {"num_experts": E, "top_k": 2, "n_group": 2, "min_experts_per_group": 2}
    Plan("mone", layers, model).validate()  # 3 kept, 2 in group 0 and 1 in group 1
    layers[0].novices = [2, 3, 4, 6]  # expert 7 neither kept nor a novice
    with pytest.raises(MoepruneError, match="neither kept nor novices"):
        Plan("mone", layers, model).validate()
    plain = [LayerPlan(1, E, [Group([e], [1.0]) for e in (0, 1, 5)])]  # plain pruning: still refused
    with pytest.raises(MoepruneError, match="not divisible by n_group=2"):
        Plan("frequency", plain, model).validate()


def test_mone_plans_on_grouped_routing_without_flattening():
    model = tiny_model("deepseek_v3")
    stats = observe(model, _ids(), batch_size=2, probe_size=32)
    plan = make_plan_for(stats, "mone", experts=KEEP)
    assert not plan.flatten_groups and plan.model["n_group"] == 2
    per_layer = {lp.layer: lp.kept for lp in plan.layers}
    assert all(len(k) == KEEP for k in per_layer.values())
    # the paper's per-layer ranking is the default: groups are not balanced unless asked
    phi = {lp.layer: torch.tensor(lp.notes["scores"]) for lp in plan.layers}
    for i, kept in per_layer.items():
        assert kept == sorted(torch.sort(-phi[i], stable=True).indices[:KEEP].tolist())
    # within_groups: the best keep / n_group of each routing group, so the count must fit the groups
    balanced = make_plan_for(stats, "mone", experts=4, options={"within_groups": True})
    for lp in balanced.layers:
        s = torch.tensor(lp.notes["scores"])
        assert lp.kept == sorted(torch.sort(-s[:4], stable=True).indices[:2].tolist()
                                 + (4 + torch.sort(-s[4:], stable=True).indices[:2]).tolist())
    with pytest.raises(MoepruneError, match="flatten-groups") as e:
        make_plan_for(stats, "mone", experts=KEEP, options={"within_groups": True})
    assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match="multiple of 2") as e:  # asked without the budget's check
        make_plan("mone", PlanRequest(stats, KEEP), within_groups=True)
    assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match="scope=layer"):
        make_plan_for(stats, "mone", experts=4, options={"within_groups": True, "scope": "global"})
    # --flatten-groups still works, and then the ranking ignores the groups
    flat = make_plan_for(stats, "mone", experts=4, flatten_groups=True, options={"within_groups": True})
    assert flat.flatten_groups
    per_layer_4 = make_plan_for(stats, "mone", experts=4)
    assert [lp.kept for lp in flat.layers] == [lp.kept for lp in per_layer_4.layers]


def test_prune_checks_refuse_odd_counts_for_pruning_and_within_groups(checkpoint, calib_file, tmp_path):
    src = checkpoint("deepseek_v3")
    with pytest.raises(MoepruneError, match="flatten-groups") as e:
        api.prune(src, "frequency", tmp_path / "no", experts=KEEP, calib=str(calib_file), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "no").exists()
    with pytest.raises(MoepruneError, match="--experts in \\[4, 6, 8\\]") as e:  # balanced novices
        api.prune(src, "mone", tmp_path / "no", experts=KEEP, calib=str(calib_file), progress=False,
                  options={"within_groups": True})
    assert "\n" not in str(e.value) and not (tmp_path / "no").exists()


# ---- in memory: same routing, exact kept experts ---------------------------------------------------
@pytest.mark.parametrize("family", sorted(GROUPED))
def test_every_token_routes_as_before_and_kept_experts_are_exact(family):
    model, stats, plan, pruned = _mone(family)
    adapter = get_adapter(model.config)
    original, blocks = adapter.moe_blocks(model), adapter.moe_blocks(pruned)
    vectors = novice_vectors(plan, stats)
    torch.manual_seed(3)
    for i, block in blocks.items():  # 3 kept: the routing groups are necessarily uneven
        lp = plan.layer(i)
        assert adapter.router(block).weight.shape[0] == 8  # the router keeps every row
        assert adapter.experts(block).down_proj.shape[0] == KEEP  # the experts really shrink
        x = torch.randn(2, 64, adapter.config.hidden_size)
        ids0, gates0, xin, _ = _routing_of(adapter, original[i], x)
        ids1, gates1, _, out1 = _routing_of(adapter, block, x)
        assert torch.equal(ids1, ids0) and torch.equal(gates1, gates0)  # same experts, same gates
        # expected experts output: gate x the original expert for kept picks, gate x novice for the others
        T, K = ids0.shape
        raw = adapter.expert_outputs(original[i], xin.repeat_interleave(K, 0), ids0.flatten())  # [T*K, H]
        novice_of = {e: vectors[i][n] for n, e in enumerate(lp.novices)}
        kept = torch.tensor([[int(e) in lp.kept for e in row] for row in ids0.tolist()])  # [T, K]
        terms = raw.view(T, K, -1).clone().double()
        for t, k in (~kept).nonzero().tolist():
            terms[t, k] = novice_of[int(ids0[t, k])]
        expected = (gates0.double()[..., None] * terms).sum(1)  # [T, H]
        torch.testing.assert_close(out1.double(), expected, rtol=0, atol=1e-5)
        assert kept.all(1).any() and (~kept).any()  # both kinds of token were seen

    # the whole model: at every MoE layer, on the hidden states it really sees, the pruned router picks what
    # the original router picks
    seen = {}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, a[0].detach().clone()))
               for i, b in blocks.items()]
    try:
        with torch.no_grad():
            pruned(_ids(5, batch=2, length=24))
    finally:
        for h in handles:
            h.remove()
    for i, x in seen.items():
        assert torch.equal(_routing_of(adapter, blocks[i], x)[0], _routing_of(adapter, original[i], x)[0])


# ---- on disk: reload, layer by layer, export-stock ---------------------------------------------------
@pytest.mark.parametrize("family", sorted(GROUPED))
def test_novice_checkpoint_on_grouped_routing_reloads_exactly(family, tmp_path):
    model, stats, plan, pruned = _mone(family)
    out = save_checkpoint(pruned, tmp_path / "mone", source="tiny", plan=plan, before=parameter_counts(model))
    loaded = moeprune.from_pretrained(out)
    ids = _ids(2, batch=2, length=24)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
    adapter = get_adapter(loaded.config)
    assert adapter.n_group == 2 and adapter.num_experts == 8
    info = moeprune.inspect(out)
    assert info["novices"]["experts_kept"] == KEEP and info["parameters"] == parameter_counts(pruned)
    for block in adapter.moe_blocks(loaded).values():
        assert adapter.router(block).weight.shape[0] == 8
    # the per-layer ranking left the groups uneven: the stock copy cannot keep them; one line says so
    with pytest.raises(MoepruneError, match="--flatten-groups") as e:
        export_stock(out, tmp_path / "stock")
    assert "\n" not in str(e.value) and "routing groups" in str(e.value)
    assert not (tmp_path / "stock").exists()
    # flattened on request: a stock model that runs, plain pruning of the same experts without groups
    stock_dir = export_stock(out, tmp_path / "stock", flatten_groups=True)
    stock = compat.model_class(tf.AutoConfig.from_pretrained(stock_dir))[1].from_pretrained(stock_dir)
    stock_adapter = get_adapter(stock.config)
    assert stock_adapter.num_experts == KEEP and stock_adapter.config.n_group == 1
    assert stock_adapter.config.topk_group == 1
    plain = Plan(method="frequency", model=plan.model, calibration=plan.calibration, flatten_groups=True,
                 layers=[LayerPlan(lp.layer, lp.num_experts_in, lp.groups) for lp in plan.layers])
    expected = apply_plan(copy.deepcopy(model), plain)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, expected(ids).logits)
    assert Plan.load(stock_dir / "moeprune_plan.json").flatten_groups
    card = (stock_dir / "README.md").read_text()
    assert "Group-limited routing flattened" in card and "Routing groups flattened because" in card


def test_within_groups_novices_export_a_grouped_stock_model(tmp_path):
    model, stats, plan, pruned = _mone("deepseek_v3", keep=4, within_groups=True)
    assert all([e // 4 for e in lp.kept] == [0, 0, 1, 1] for lp in plan.layers)
    out = save_checkpoint(pruned, tmp_path / "mone", source="tiny", plan=plan, before=parameter_counts(model))
    stock_dir = export_stock(out, tmp_path / "stock")
    config = json.loads((stock_dir / "config.json").read_text())
    assert config["n_routed_experts"] == 4 and config["n_group"] == 2 and config["topk_group"] == 1
    stock = tf.AutoModelForCausalLM.from_pretrained(stock_dir)
    plain = Plan(method="frequency", model=plan.model, calibration=plan.calibration,
                 layers=[LayerPlan(lp.layer, lp.num_experts_in, lp.groups) for lp in plan.layers])
    plain.validate()  # a valid grouped pruning plan: the same thing pruning methods write
    expected = apply_plan(copy.deepcopy(model), plain)
    ids = _ids(2, batch=2, length=24)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, expected(ids).logits)
    assert not Plan.load(stock_dir / "moeprune_plan.json").flatten_groups
    assert "Group-limited routing kept" in (stock_dir / "README.md").read_text()


def test_stock_group_problem_names_what_a_stock_router_cannot_do():
    ok = {1: [0, 1, 4, 5]}
    assert stock_group_problem(ok, 8, 2, 1, 2, 2) is None
    assert "3, 1 experts" in stock_group_problem({1: [0, 1, 2, 4]}, 8, 2, 1, 2, 2)
    assert "at least 2" in stock_group_problem({1: [0, 4]}, 8, 2, 1, 2, 2)
    assert "fewer than its top-6" in stock_group_problem(ok, 8, 2, 1, 6, 2)
    assert "out of routing-group order" in stock_group_problem({1: [0, 4, 1, 5]}, 8, 2, 1, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "glm_moe_dsa", "kimi_k25"])
def test_layer_by_layer_equals_in_memory_and_the_cli_exports(family, calib_file, tmp_path, capsys):
    src = tmp_path / "src"
    save_tiny_checkpoint(family, src, **GROUPED[family])
    common = dict(experts=KEEP, calib=str(calib_file), samples=4, seq_len=32, progress=False)
    layerwise = api.prune(src, "mone", tmp_path / "lw", layerwise=True, **common)
    in_memory = api.prune(src, "mone", tmp_path / "mem", layerwise=False, **common)
    assert not Plan.load(layerwise / "moeprune_plan.json").flatten_groups
    a, b = moeprune.from_pretrained(layerwise), moeprune.from_pretrained(in_memory)
    ids = _ids(4, batch=2, length=24)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert (json.loads((layerwise / "config.json").read_text())["moeprune_novice"]
            == json.loads((in_memory / "config.json").read_text())["moeprune_novice"])
    capsys.readouterr()
    assert main(["export-stock", str(layerwise), "--out", str(tmp_path / "stock")]) == 2
    message = capsys.readouterr().err.strip()
    assert "--flatten-groups" in message and len(message.splitlines()) == 1
    assert main(["export-stock", str(layerwise), "--out", str(tmp_path / "stock"), "--flatten-groups"]) == 0
    assert get_adapter(tf.AutoConfig.from_pretrained(tmp_path / "stock")).config.n_group == 1


def test_sweep_budgets_leave_mone_free_on_grouped_routing(checkpoint, calib_file, tmp_path, monkeypatch):
    import moeprune.outputs
    from moeprune.sweep import sweep

    class Checked(Exception):
        """Raised where the sweep's checks end, before any work."""

    def stop(*args, **kwargs):
        raise Checked

    monkeypatch.setattr(moeprune.outputs, "check_output_dir", stop)
    src = checkpoint("deepseek_v3")
    with pytest.raises(Checked):  # 0.625 keeps 3 of 8: fine for novices alone
        sweep(src, ["mone"], [0.625], str(calib_file), tmp_path / "s", texts=[calib_file])
    with pytest.raises(MoepruneError, match="flatten-groups"):  # not once a pruning method shares it
        sweep(src, ["mone", "frequency"], [0.625], str(calib_file), tmp_path / "s", texts=[calib_file])
