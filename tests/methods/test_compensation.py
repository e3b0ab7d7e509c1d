"""Closed-form compensation: the ridge fit (pure), the layer fit written by surgery, `prune --compensate`."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import saved_tensors

from moeprune.api import compensation_config
from moeprune.api import prune as prune_model
from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods.compensation import CompensationConfig, RidgeFit, RoutedPairs
from moeprune.pipeline.compensate import LayerCompensation, experts_calls, held_out_rule
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.store.checkpoint import load_model
from moeprune.surgery import apply_layer_plan

PRUNE = dict(samples=16, seq_len=32, batch_size=4, probe_size=64, progress=False)


def _pairs(T, R, I, D, K, dW_true, noise, gen):
    """Synthetic routed pairs whose target is exactly Σ g ΔW_true a (+ noise)."""
    slots = torch.stack([torch.randperm(R, generator=gen)[:K] for _ in range(T)])  # [T, K]
    tokens = torch.arange(T).repeat_interleave(K)
    hidden = torch.randn(T * K, I, generator=gen)  # g · a
    target = torch.einsum("sdi,si->sd", dW_true[slots.reshape(-1)], hidden).view(T, K, D).sum(1)
    target = target + noise * torch.randn(T, D, generator=gen)
    empty = torch.zeros(0, dtype=torch.long)
    return RoutedPairs(tokens, slots.reshape(-1), hidden, empty, empty, torch.zeros(0), target)


@pytest.mark.parametrize("joint_limit", [8192, 1])
def test_ridge_fit_recovers_a_planted_down_delta(joint_limit):
    gen = torch.Generator().manual_seed(0)
    R, I, D = 3, 5, 4
    dW = torch.randn(R, D, I, generator=gen)
    K = 2 if joint_limit > 1 else 1  # the per-expert solve is exact when no token shares two experts
    fit = RidgeFit(CompensationConfig(fit="down", alphas=(1e-8,), joint_limit=joint_limit), R, I, 0, D)
    for b in range(6):
        fit.add(_pairs(64, R, I, D, K, dW, 0.0, gen), held_out=b == 5)
    got, dn, notes = fit.solve()
    assert notes["applied"] and dn is None
    assert notes["solve"] == ("joint" if joint_limit > 1 else "per expert")
    torch.testing.assert_close(got.float(), dW, atol=1e-4, rtol=1e-4)
    assert notes["held_out_error_after"] < 1e-6 * notes["held_out_error_before"]


def test_a_fit_to_noise_is_not_applied():
    gen = torch.Generator().manual_seed(1)
    R, I, D = 4, 16, 8
    fit = RidgeFit(CompensationConfig(fit="down", alphas=(1e-6,)), R, I, 0, D)
    for b in range(4):  # few tokens per feature: the fit chases noise
        fit.add(_pairs(40, R, I, D, 2, torch.zeros(R, D, I), 1.0, gen), held_out=b == 3)
    dW, dn, notes = fit.solve()
    assert dW is None and dn is None
    assert not notes["applied"] and notes["why_not"] == "the fit did not lower the held-out error"
    assert notes["held_out_error_after"] >= notes["held_out_error_before"]


def test_novice_fit_solves_the_joint_least_squares():
    """Novice vectors fitted together: the solution of the normal equations (two novices on shared tokens)."""
    gen = torch.Generator().manual_seed(2)
    D, T = 3, 200
    c = torch.randn(2, D, generator=gen)
    g = torch.rand(T, 2, generator=gen)
    target = g @ c  # [T, D] both novices on every token
    empty = torch.zeros(0, dtype=torch.long)
    pairs = RoutedPairs(empty, empty, torch.zeros(0, 1), torch.arange(T).repeat_interleave(2),
                        torch.tensor([0, 1]).repeat(T), g.reshape(-1), target)
    fit = RidgeFit(CompensationConfig(fit="novices", alphas=(1e-9,)), 2, 1, 2, D)
    fit.add(pairs, held_out=False)
    fit.add(pairs, held_out=True)
    dW, dn, notes = fit.solve()
    assert dW is None and notes["applied"]
    torch.testing.assert_close(dn.float(), c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("joint_limit", [8192, 1])
def test_the_early_alpha_search_keeps_the_full_grids_choice_and_solves_fewer(joint_limit):
    """A noisy fit whose held-out error falls, then rises along the grid: the early search stops after the
    rise and picks the α the full grid picks."""
    alphas = (1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    results = {}
    for search in ("early", "full"):
        gen = torch.Generator().manual_seed(3)
        R, I, D = 4, 12, 6
        dW = 0.3 * torch.randn(R, D, I, generator=gen)
        fit = RidgeFit(CompensationConfig(fit="down", alphas=alphas, alpha_search=search,
                                          joint_limit=joint_limit), R, I, 0, D)
        for b in range(5):
            fit.add(_pairs(48, R, I, D, 2, dW, 2.0, gen), held_out=b == 4)
        _, _, results[search] = fit.solve()
    early, full = results["early"], results["full"]
    assert full["alphas_tried"] == len(alphas)
    assert early["alphas_tried"] < len(alphas)
    assert early["alpha"] == full["alpha"] and early["held_out_error_after"] == full["held_out_error_after"]


def test_options_are_checked_in_one_line():
    for bad in ({"fit": "up"}, {"holdout": 0.0}, {"holdout": 0.7}, {"alphas": ()}, {"alphas": (-1.0,)},
                {"joint_limit": 0}, {"alpha_search": "fast"}):
        with pytest.raises(MoepruneError) as e:
            CompensationConfig(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match="--compensate 'all' is not a known fit"):
        compensation_config("all")


@pytest.mark.parametrize("family,fit", [("mixtral", "down"), ("qwen2_moe", "down"), ("deepseek_v3", "down"),
                                        ("deepseek_v3", "down+novices"), ("glm4_moe", "down")])
def test_the_layer_fit_written_by_surgery_has_the_error_it_reports(family, fit):
    """After `finish`, the block's real held-out error is the one the notes record, and lower than before
    (DeepSeek-V3's group-limited router included, with novices behind its full router)."""
    torch.manual_seed(0)
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    i, block = next(iter(adapter.moe_blocks(model).items()))
    E = adapter.num_experts
    kept = list(range(0, E, 2)) if adapter.n_group == 1 else list(range(E // 2))
    if adapter.n_group > 1:  # keep a multiple of the groups, each group's first experts
        per = E // adapter.n_group
        kept = [g * per + j for g in range(adapter.n_group) for j in range(per // 2)]
    novices = [e for e in range(E) if e not in kept] if "novices" in fit or "lowrank" in fit else []
    lp = LayerPlan(layer=i, num_experts_in=E, groups=[Group([e], [1.0]) for e in kept], novices=novices)
    original = copy.deepcopy(block)
    vectors = torch.zeros(len(novices), adapter.expert_dim) if novices else None
    apply_layer_plan(adapter, block, lp, vectors)
    fit = LayerCompensation(CompensationConfig(fit=fit), adapter, block, original, lp, held_out_rule(0.25))
    H = model.config.hidden_size
    xs = [torch.randn(4, 16, H) for _ in range(4)]
    for b, x in enumerate(xs):
        fit.add_batch(x, torch.arange(4 * b, 4 * b + 4))
    before = copy.deepcopy(block)
    notes = fit.finish()
    assert notes["applied"], notes

    def held_out_error(blk):
        total = 0.0
        for b, x in enumerate(xs):
            rows = held_out_rule(0.25)(torch.arange(4 * b, 4 * b + 4))
            with torch.no_grad(), experts_calls(adapter, original) as ref, \
                    experts_calls(adapter, blk) as mine:
                adapter.moe_forward(original, x[rows])
                adapter.moe_forward(blk, x[rows])
            if ref:
                total += float(((ref[0][3].double() - mine[0][3].double()) ** 2).sum())
        return total

    assert held_out_error(before) == pytest.approx(notes["held_out_error_before"], rel=1e-3)
    assert held_out_error(block) == pytest.approx(notes["held_out_error_after"], rel=1e-3)
    assert notes["held_out_error_after"] < notes["held_out_error_before"]
    if novices:  # the novices moved off zero
        assert adapter.experts(block).novice_vectors.abs().sum() > 0
    # only the down projections changed
    for name, p in adapter.expert_parameters(block).items():
        same = torch.equal(p, adapter.expert_parameters(before)[name])
        assert same == ("down_proj" not in name), name


@pytest.mark.slow
def test_prune_compensate_down_writes_a_stock_checkpoint(checkpoint, calib_file, tmp_path):
    src = checkpoint("mixtral")
    plain = prune_model(src, "reap", tmp_path / "plain", ratio=0.5, calib=str(calib_file), compensate="none",
                        **PRUNE)
    fitted = prune_model(src, "reap", tmp_path / "fitted", ratio=0.5, calib=str(calib_file),
                         compensate="down", **PRUNE)
    plan = Plan.load(fitted / "moeprune_plan.json")
    assert plan.compensation["fit"] == "down" and plan.calibration["sequential"] is True
    applied = [lp.layer for lp in plan.layers if lp.notes["compensation"]["applied"]]
    assert applied, [lp.notes["compensation"] for lp in plan.layers]
    a, b = saved_tensors(plain), saved_tensors(fitted)
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    # Mixtral's on-disk name of the down projection is w2
    assert changed and all("down_proj" in k or ".w2." in k for k in changed), sorted(changed)
    model = load_model(fitted)  # stock transformers
    ids = torch.randint(3, 400, (2, 16))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_prune_mone_with_fitted_novices_reloads(checkpoint, calib_file, tmp_path):
    import moeprune

    src = checkpoint("mixtral")
    out = prune_model(src, "mone", tmp_path / "o", ratio=0.5, calib=str(calib_file),
                      compensate="down+novices", **PRUNE)
    plan = Plan.load(out / "moeprune_plan.json")
    assert all("compensation" in lp.notes for lp in plan.layers)
    model = moeprune.from_pretrained(out)
    assert torch.isfinite(model(torch.randint(3, 400, (2, 16))).logits).all()


def test_compensation_is_refused_before_any_work(checkpoint, calib_file, tmp_path):
    src = checkpoint("mixtral")
    cases = [
        (dict(method="reap", compensate="novices", calib=str(calib_file)), "fits novice vectors"),
        (dict(method="reap", compensate="down", calib=None), "needs calibration|pass --calib"),
        (dict(method="mone", compensate="down", calib=str(calib_file), options={"scope": "global"}),
         "ranks all layers together"),
        (dict(method="reap", compensate="both", calib=str(calib_file)), "not a known fit"),
    ]
    for kwargs, message in cases:
        method = kwargs.pop("method")
        with pytest.raises(MoepruneError, match=message) as e:
            prune_model(src, method, tmp_path / "never", ratio=0.5, **kwargs, **PRUNE)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "never").exists()


def test_compensation_that_does_not_fit_in_memory_is_refused_before_calibration(checkpoint, calib_file,
                                                                                tmp_path, monkeypatch):
    import moeprune.runtime

    cfg = CompensationConfig(fit="down")
    # joint: P = R·I features, P² + P·D float64; per expert beyond joint_limit: R·I·(I + D)
    assert cfg.accumulator_bytes(4, 16, 8, 0) == 8 * (64 * 64 + 64 * 8)
    small = CompensationConfig(fit="down", joint_limit=10)
    assert small.accumulator_bytes(4, 16, 8, 0) == 8 * 4 * (16 * 16 + 16 * 8)
    monkeypatch.setattr(moeprune.runtime, "available_memory", lambda: 1024)
    with pytest.raises(MoepruneError, match="GiB per layer .*normal equations.*copy of the original") as e:
        prune_model(checkpoint("mixtral"), "reap", tmp_path / "never", ratio=0.5, calib=str(calib_file),
                    compensate="down", **PRUNE)
    assert "\n" not in str(e.value) and not (tmp_path / "never").exists()


def test_the_model_card_says_what_was_chosen_and_fitted():
    from moeprune.store.checkpoint import _choice_and_fit_lines

    lp = LayerPlan(layer=0, num_experts_in=4, groups=[Group([0], [1.0]), Group([1], [1.0])],
                   notes={"chosen": "reap", "errors": {"reap": 0.25, "ean": 0.5},
                          "compensation": {"applied": True, "held_out_relative_before": 0.2,
                                           "held_out_relative_after": 0.05}})
    lp1 = LayerPlan(layer=1, num_experts_in=4, groups=[Group([0], [1.0]), Group([2], [1.0])],
                    notes={"chosen": "ean", "errors": {"reap": 0.5, "ean": 0.125},
                           "compensation": {"applied": False, "held_out_relative_before": 0.1,
                                            "held_out_relative_after": 0.2}})
    plan = Plan(method="auto", layers=[lp, lp1], model={"num_experts": 4, "top_k": 1},
                compensation={"fit": "down"})
    text = "\n".join(_choice_and_fit_lines(plan))
    assert "0: reap (0.25), 1: ean (0.125)" in text
    assert "applied in layers [0]" in text and "1: 0.1 → 0.2 (not applied)" in text


def test_the_default_compensation_is_down_where_it_can_run_and_says_so(checkpoint, calib_file, tmp_path):
    heard: list[str] = []
    out = prune_model(checkpoint("mixtral"), "reap", tmp_path / "on", ratio=0.5, calib=str(calib_file),
                      notify=heard.append, **PRUNE)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.compensation["fit"] == "down" and plan.compensation["required"] is False
    assert any(lp.notes["compensation"]["applied"] for lp in plan.layers)
    assert any(line.startswith("compensation: down (the default") for line in heard), heard
    # DBRX's experts hold no down_proj tensor: the default turns itself off, says why, and the prune succeeds
    heard.clear()
    out = prune_model(checkpoint("dbrx"), "reap", tmp_path / "off", ratio=0.5, calib=str(calib_file),
                      notify=heard.append, **PRUNE)
    assert not Plan.load(out / "moeprune_plan.json").compensation
    assert any(line.startswith("compensation: off (") and "down_proj" in line for line in heard), heard
    # asked for explicitly, the same is refused in one line before any work
    with pytest.raises(MoepruneError, match="no down_proj") as e:
        prune_model(checkpoint("dbrx"), "reap", tmp_path / "never", ratio=0.5, calib=str(calib_file),
                    compensate="down", **PRUNE)
    assert "\n" not in str(e.value) and not (tmp_path / "never").exists()


def test_a_router_refit_under_torchrun_is_refused_and_the_default_stays_on(calib_file, monkeypatch):
    from moeprune.api import check_compensation
    from moeprune.methods import get_method
    from moeprune.settings import CalibrationRequest

    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = get_method("reap")
    calib = CalibrationRequest(str(calib_file))
    with pytest.raises(MoepruneError, match="one process only") as e:
        check_compensation(compensation_config("router"), "reap", spec, spec.default_config(), calib)
    assert "\n" not in str(e.value)
    # the experts' fits add their normal equations over the processes (tests/test_distributed.py)
    cfg, note = check_compensation(compensation_config("auto"), "reap", spec, spec.default_config(), calib)
    assert cfg.active and cfg.fit == "down" and note.startswith("compensation: down")
