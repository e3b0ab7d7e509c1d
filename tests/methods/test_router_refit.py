"""Router refit (`--compensate router`, `router+down`): the linearised ridge (pure), its first-order model
against the real block, and the whole prune path (stock output, refusals before calibration)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import saved_tensors

from moeprune.api import prune as prune_model
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods.compensation import CompensationConfig
from moeprune.methods.router_refit import RouterRidge, kept_directions, principal_directions, router_features
from moeprune.pipeline.compensate import experts_calls
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.store.checkpoint import load_model
from moeprune.surgery import apply_layer_plan
from moeprune.surgery.compensation import add_to_router

PRUNE = dict(samples=16, seq_len=32, batch_size=4, probe_size=64, progress=False)


def test_the_router_ridge_recovers_planted_rows():
    """Targets made exactly by the linear model Σ_k v_tk (θ_{s_tk} · x_t): the solve gives θ back."""
    gen = torch.Generator().manual_seed(0)
    R, H, D, K, T = 4, 6, 5, 2, 400
    theta = torch.randn(R, H, generator=gen)
    ridge = RouterRidge(R, H)
    for _ in range(3):
        x = torch.randn(T, H, generator=gen)
        sel = torch.stack([torch.randperm(R, generator=gen)[:K] for _ in range(T)])  # [T, K]
        v = torch.randn(T, K, D, generator=gen)
        r = torch.einsum("tkd,tk->td", v, (theta[sel] * x[:, None, :]).sum(-1))
        ridge.add(x, sel, v, r)
    torch.testing.assert_close(ridge.solve(1e-10).float(), theta, atol=1e-4, rtol=1e-4)
    assert RouterRidge.accumulator_bytes(R, H) == 8 * (2 * (R * H) ** 2 + R * H)


@pytest.mark.parametrize("family,overrides,rule", [("mixtral", {}, "renormalised"),
                                                    ("qwen2_moe", {"norm_topk_prob": False}, "softmax")])
def test_the_first_order_model_matches_the_block(family, overrides, rule):
    """On a pruned block, a small change of the router rows moves the experts' output as Σ_j u_tj (θ_j · x_t)
    predicts, for both gate rules (the gates' Jacobian and the features are right)."""
    torch.manual_seed(0)
    model = tiny_model(family, **overrides).eval()
    adapter = get_adapter(model.config)
    block = copy.deepcopy(next(iter(adapter.moe_blocks(model).values())))
    E = adapter.num_experts
    lp = LayerPlan(layer=0, num_experts_in=E, groups=[Group([e], [1.0]) for e in range(0, E, 2)])
    apply_layer_plan(adapter, block, lp, None)
    H = model.config.hidden_size
    x = torch.randn(1, 24, H)
    with torch.no_grad(), experts_calls(adapter, block) as calls:
        adapter.moe_forward(block, x)
    x_e, idx, w, y = calls[0]
    T, K = idx.shape
    raw = adapter.expert_outputs(block, x_e.repeat_interleave(K, 0), idx.reshape(-1)).view(T, K, -1)
    router = adapter.router(block)
    probabilities = torch.softmax(x.reshape(T, H) @ router.weight.T, dim=-1)  # [T, R]
    rows, u = router_features(rule, w.float(), idx, raw.float(), probabilities)
    theta = 1e-3 * torch.randn(lp.num_experts_out, H)
    predicted = torch.einsum("tjd,tj->td", u, (theta[rows] * x.reshape(T, 1, H)).sum(-1))
    add_to_router(adapter, block, theta.double())
    with torch.no_grad(), experts_calls(adapter, block) as after:
        adapter.moe_forward(block, x)
    same = (after[0][1].sort(1).values == idx.sort(1).values).all(1)  # [T] tokens whose selection held
    assert same.float().mean() > 0.8
    moved = (after[0][3] - y)[same]
    assert float((moved - predicted[same]).norm()) < 1e-2 * float(moved.norm())
    # and the other rule's features do not predict it
    other = "softmax" if rule == "renormalised" else "renormalised"
    rows, u = router_features(other, w.float(), idx, raw.float(), probabilities)
    wrong = torch.einsum("tjd,tj->td", u, (theta[rows] * x.reshape(T, 1, H)).sum(-1))
    assert float((moved - wrong[same]).norm()) > 0.1 * float(moved.norm())


def test_the_inputs_are_projected_onto_their_top_directions_when_the_rows_are_many():
    gen = torch.Generator().manual_seed(1)
    assert kept_directions(4, 16, 1024) == 16 and kept_directions(64, 4096, 1024) == 16
    x = torch.randn(500, 3, generator=gen) @ torch.randn(3, 12, generator=gen)  # rank 3 in 12 dimensions
    V = principal_directions(x, 3)  # [12, 3]
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)
    assert float((x.double() - x.double() @ V @ V.T).norm()) < 1e-6 * float(x.norm())  # the span holds x


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides,fit", [("mixtral", {}, "router"), ("mixtral", {}, "router+down"),
                                                  ("qwen2_moe", {"norm_topk_prob": False}, "router")])
def test_prune_with_a_router_refit_writes_a_stock_checkpoint(checkpoint, calib_file, tmp_path, family,
                                                              overrides, fit):
    src = checkpoint(family, **overrides)
    # enough tokens per unknown that a refit can beat the held-out error (the same tokens for both)
    settings = {**PRUNE, "samples": 64}
    plain = prune_model(src, "reap", tmp_path / "plain", ratio=0.5, calib=str(calib_file), sequential=True,
                        compensate="none", **settings)
    fitted = prune_model(src, "reap", tmp_path / "fitted", ratio=0.5, calib=str(calib_file), compensate=fit,
                         **settings)
    plan = Plan.load(fitted / "moeprune_plan.json")
    notes = [lp.notes["compensation"] for lp in plan.layers]
    router = [n if fit == "router" else n["router"] for n in notes]
    for r in router:  # scored with the real routing on held-out tokens: never worse than no refit
        assert r["gates"] == ("softmax" if overrides else "renormalised")
        assert r["held_out_error_after"] <= r["held_out_error_before"]
        assert r["applied"] == (r["held_out_error_after"] < r["held_out_error_before"])
    if not overrides:
        # on the random tiny Mixtral the step helps; on the random tiny Qwen2-MoE without renormalisation
        # every gate is inflated about twice, more than moving unselected logits can take back while
        # they stay unselected, and the real held-out check turns the refit down (as it should)
        assert any(r["applied"] for r in router), router
    a, b = saved_tensors(plain), saved_tensors(fitted)
    # layer 0 has the same inputs, so the same plan, in both; later layers rank compressed inputs
    changed = {k for k in a if "layers.0." in k and not torch.equal(a[k], b[k])}
    allowed = ("gate.weight",) if fit == "router" else ("gate.weight", ".w2.", "down_proj")
    assert any("gate.weight" in k for k in changed) == router[0]["applied"], sorted(changed)
    assert all(any(s in k for s in allowed) for k in changed), sorted(changed)
    model = load_model(fitted)  # stock transformers
    assert torch.isfinite(model(torch.randint(3, 400, (2, 16))).logits).all()


def test_a_router_refit_is_refused_before_calibration_where_it_does_not_apply(checkpoint, calib_file,
                                                                               tmp_path):
    cases = [
        (checkpoint("deepseek_v3"), "reap", "deepseek_v3's are not"),
        (checkpoint("mixtral"), "mone", "makes novices"),
    ]
    for src, method, message in cases:
        with pytest.raises(MoepruneError, match=message) as e:
            prune_model(src, method, tmp_path / "never", ratio=0.5, calib=str(calib_file),
                        compensate="router", **PRUNE)
        assert "\n" not in str(e.value) and not (tmp_path / "never").exists()


def test_router_fits_are_options_of_the_compensation():
    cfg = CompensationConfig(fit="router+down")
    assert cfg.fits_router and cfg.fits_down and cfg.without_router.fit == "down"
    assert CompensationConfig(fit="router").without_router.fit == "none"
    # the two fits run in turn, so the larger of their accumulators
    assert cfg.accumulator_bytes(4, 16, 8, 0, router_width=8) == max(
        RouterRidge.accumulator_bytes(4, 9), CompensationConfig(fit="down").accumulator_bytes(4, 16, 8, 0))
