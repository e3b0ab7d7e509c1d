"""Low-rank novices (`--compensate lowrank`): the reduced-rank ridge fit, the runtime, the store, counts."""

from __future__ import annotations

import copy

import pytest
import torch

from moeprune.api import compensation_config
from moeprune.api import prune as prune_model
from moeprune.arch import get_adapter
from moeprune.arch.base import decoder_layers, has_low_rank_novices, novice_parameter_count
from moeprune.arch.tiny import tiny_model
from moeprune.errors import MoepruneError
from moeprune.methods.compensation import CompensationConfig, LowRankDelta, RidgeFit, RoutedPairs
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.store.checkpoint import checkpoint_parameters, parameter_counts
from moeprune.surgery import apply_layer_plan
from moeprune.surgery.compensation import make_low_rank_novices

PRUNE = dict(samples=16, seq_len=32, batch_size=4, probe_size=64, progress=False)


def _novice_pairs(T, N, D, K, bias, W, noise, gen):
    """Synthetic novice pairs: K distinct novices per token, target Σ g (bias_n + W_n x) (+ noise)."""
    slots = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(T)]).reshape(-1)  # [T*K]
    tokens = torch.arange(T).repeat_interleave(K)
    x = torch.randn(T, D, generator=gen)
    g = torch.rand(T * K, generator=gen) + 0.2
    per_pair = bias[slots] + torch.einsum("sde,se->sd", W[slots], x[tokens])  # [S', D]
    target = torch.zeros(T, D).index_add_(0, tokens, g[:, None] * per_pair)
    target = target + noise * torch.randn(T, D, generator=gen)
    empty = torch.zeros(0, dtype=torch.long)
    return RoutedPairs(empty, empty, torch.zeros(0, 1), tokens, slots, g, target, x[tokens])


def _planted(N, D, r, gen):
    bias = torch.randn(N, D, generator=gen)
    W = torch.randn(N, D, r, generator=gen) @ torch.randn(N, r, D, generator=gen) / D**0.5  # rank r
    return bias, W


@pytest.mark.parametrize("joint_limit,K", [(8192, 2), (1, 1)])
def test_reduced_rank_fit_recovers_a_planted_rank_r_map(joint_limit, K):
    """Joint (two novices per token) and per-novice blocks: b and U Vᵀ come back exactly, rank r."""
    gen = torch.Generator().manual_seed(0)
    N, D, r = 3, 6, 2
    bias, W = _planted(N, D, r, gen)
    cfg = CompensationConfig(fit="lowrank", rank=r, alphas=(1e-9,), joint_limit=joint_limit)
    fit = RidgeFit(cfg, 4, 5, N, D)
    assert fit.joint == (joint_limit > 1) and fit.B == D + 1
    for b in range(5):
        fit.add(_novice_pairs(80, N, D, K, bias, W, 0.0, gen), held_out=b == 4)
    dW, dn, notes = fit.solve()
    assert dW is None and isinstance(dn, LowRankDelta) and notes["applied"] and notes["novice_rank"] == r
    assert dn.up.shape == dn.down.shape == (N, D, r)
    torch.testing.assert_close(dn.bias.float(), bias, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((dn.up @ dn.down.transpose(1, 2)).float(), W, atol=1e-4, rtol=1e-4)
    assert notes["held_out_error_after"] < 1e-8 * notes["held_out_error_before"]


def test_a_lower_rank_keeps_the_top_directions():
    """Rank 1 on a rank-2 map with one dominant direction: the fit is the best rank-1 map under the
    (isotropic) input, i.e. the map's top singular pair."""
    gen = torch.Generator().manual_seed(3)
    D = 5
    a, b = torch.linalg.qr(torch.randn(D, 2, generator=gen))[0].T, torch.linalg.qr(torch.randn(D, 2,
                                                                                           generator=gen))[0].T
    W = (3.0 * torch.outer(a[0], b[0]) + 0.5 * torch.outer(a[1], b[1]))[None]  # [1, D, D]
    fit = RidgeFit(CompensationConfig(fit="lowrank", rank=1, alphas=(1e-9,)), 1, 1, 1, D)
    T = 4000
    x = torch.randn(T, D, generator=gen)
    empty = torch.zeros(0, dtype=torch.long)
    pairs = RoutedPairs(empty, empty, torch.zeros(0, 1), torch.arange(T), torch.zeros(T, dtype=torch.long),
                        torch.ones(T), x @ W[0].T, x)
    fit.add(pairs, held_out=False)
    fit.add(pairs, held_out=True)
    _, dn, notes = fit.solve()
    got = (dn.up @ dn.down.transpose(1, 2))[0].float()
    best = 3.0 * torch.outer(a[0], b[0])
    assert notes["applied"]
    torch.testing.assert_close(got, best, atol=0.05, rtol=0.05)  # the sample covariance is not exactly I
    assert torch.linalg.matrix_rank(got) == 1


def test_the_rank_step_weighs_by_the_input_covariance():
    """Correlated, uneven inputs: the rank-r map is the reduced-rank regression optimum
    [W Σ^½]_r Σ^-½ (Σ the input second moment), which beats truncating W's own SVD."""
    gen = torch.Generator().manual_seed(4)
    D, r, T = 6, 2, 3000
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    f64 = torch.float64
    mix = torch.randn(D, D, generator=gen, dtype=f64) * torch.logspace(1, -1, D, dtype=f64)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64) @ mix  # [T, D], zero-mean-ish, anisotropic
    x = x - x.mean(0)  # exactly centred: the free bias is then exactly zero
    y = x @ W.T
    empty = torch.zeros(0, dtype=torch.long)
    pairs = RoutedPairs(empty, empty, torch.zeros(0, 1), torch.arange(T), torch.zeros(T, dtype=torch.long),
                        torch.ones(T), y.float(), x.float())
    fit = RidgeFit(CompensationConfig(fit="lowrank", rank=r, alphas=(1e-12,)), 1, 1, 1, D)
    fit.add(pairs, held_out=False)
    fit.add(pairs, held_out=True)
    _, dn, _ = fit.solve()
    got = (dn.up @ dn.down.transpose(1, 2))[0]
    xf = x.float().double()  # what the fit saw
    S = xf.T @ xf
    evals, evecs = torch.linalg.eigh(S)
    half, minus_half = (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T
    u, sv, vt = torch.linalg.svd(W @ half)
    best = (u[:, :r] * sv[:r]) @ vt[:r] @ minus_half
    torch.testing.assert_close(got, best, atol=1e-3, rtol=1e-3)
    u, sv, vt = torch.linalg.svd(W)
    plain = (u[:, :r] * sv[:r]) @ vt[:r]

    def err(M):
        return float(((y - xf @ M.T) ** 2).sum())

    assert err(got) < 0.99 * err(plain)


def test_a_low_rank_fit_to_noise_is_not_applied():
    gen = torch.Generator().manual_seed(1)
    N, D = 4, 8
    fit = RidgeFit(CompensationConfig(fit="lowrank", rank=4, alphas=(1e-6,)), 2, 3, N, D)
    zero = torch.zeros(N, D), torch.zeros(N, D, D)
    for b in range(4):  # few tokens per feature: the fit chases noise
        fit.add(_novice_pairs(24, N, D, 2, *zero, 1.0, gen), held_out=b == 3)
    dW, dn, notes = fit.solve()
    assert dW is None and dn is None
    assert not notes["applied"] and notes["why_not"] == "the fit did not lower the held-out error"


def test_options_are_checked_in_one_line():
    for bad in ({"fit": "lowrank", "rank": 0}, {"fit": "lowrank", "rank": 2.5}):
        with pytest.raises(MoepruneError) as e:
            CompensationConfig(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match="--compensate-rank 4 sets the rank of low-rank novices"):
        compensation_config("down", rank=4)
    assert compensation_config("down+lowrank", rank=4).rank == 4
    cfg = CompensationConfig(fit="down+lowrank")
    assert cfg.fits_down and cfg.fits_novices and cfg.low_rank and cfg.rank == 8


def _mone_block(family="mixtral", kept=(0, 2), r=3, seed=0):
    """A tiny model's first MoE block with novices (the unkept experts), made low-rank with random factors."""
    torch.manual_seed(seed)
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    i, block = next(iter(adapter.moe_blocks(model).items()))
    E = adapter.num_experts
    novices = [e for e in range(E) if e not in kept]
    lp = LayerPlan(layer=i, num_experts_in=E, groups=[Group([e], [1.0]) for e in kept], novices=novices)
    H = adapter.expert_dim
    apply_layer_plan(adapter, block, lp, torch.randn(len(novices), H))
    constant = copy.deepcopy(block)
    U, V = torch.randn(len(novices), H, r), torch.randn(len(novices), H, r)
    make_low_rank_novices(adapter, block, torch.zeros(len(novices), H), U, V)
    return model, adapter, block, constant, lp


def test_the_runtime_adds_g_times_b_plus_u_vt_x():
    """A tiny Mixtral block: the experts output with low-rank novices is the constant-novice output plus
    Σ over novice pairs of g · U (Vᵀ x), computed here by hand token by token."""
    model, adapter, block, constant, lp = _mone_block()
    ex = adapter.experts(block)
    assert has_low_rank_novices(ex)
    T, H = 10, adapter.expert_dim
    x = torch.randn(T, H)
    E = adapter.num_experts
    top = torch.stack([torch.randperm(E)[:2] for _ in range(T)])  # [T, 2] router ids, novices among them
    w = torch.rand(T, 2)
    got = ex(x, top, w)
    base = adapter.experts(constant)(x, top, w)
    want = base.clone()
    kept_count = ex.down_proj.shape[0]
    for t in range(T):
        for k in range(2):
            slot = int(ex.expert_map[top[t, k]])
            if slot >= kept_count:
                n = slot - kept_count
                want[t] += w[t, k] * (ex.novice_u[n] @ (ex.novice_v[n].T @ x[t]))
    assert any(int(ex.expert_map[e]) >= kept_count for e in top.reshape(-1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # without the factors it is the constant-novice runtime, bit for bit
    del ex._buffers["novice_u"], ex._buffers["novice_v"]
    assert torch.equal(ex(x, top, w), base)


def test_parameter_counts_include_the_factors():
    model, adapter, block, constant, lp = _mone_block(r=3)
    n, H = len(lp.novices), adapter.expert_dim
    assert novice_parameter_count(adapter.experts(block)) == n * (H + 2 * H * 3)
    with_factors = parameter_counts(model)
    assert with_factors["novices"] == n * (H + 2 * H * 3)
    del adapter.experts(block)._buffers["novice_u"], adapter.experts(block)._buffers["novice_v"]
    without = parameter_counts(model)
    assert with_factors["total"] - without["total"] == n * 2 * H * 3
    assert with_factors["routed_experts"] == without["routed_experts"]


def test_making_novices_low_rank_twice_is_refused():
    model, adapter, block, constant, lp = _mone_block()
    n, H = len(lp.novices), adapter.expert_dim
    with pytest.raises(MoepruneError, match="already low-rank"):
        make_low_rank_novices(adapter, block, torch.zeros(n, H), torch.zeros(n, H, 2), torch.zeros(n, H, 2))


@pytest.mark.slow
def test_prune_mone_compensate_lowrank_reloads_layer_by_layer(checkpoint, calib_file, tmp_path, monkeypatch):
    """`prune --compensate lowrank`: the written checkpoint, loaded with moeprune.from_pretrained, gives the
    in-memory model's hidden states at every layer and its logits; counts and card include U, V; export-stock
    drops the novices as it does constant ones."""
    import moeprune
    from moeprune.pipeline import loop

    src = checkpoint("mixtral")
    snapshots = {}  # decoder layer i as the walk held it right before writing it (novices attached)
    write = loop._layer_tensors

    def snapshot(source, i, layer, block, novice_tensors):
        snapshots[i] = copy.deepcopy(layer)
        return write(source, i, layer, block, novice_tensors)

    monkeypatch.setattr(loop, "_layer_tensors", snapshot)
    r = 4
    out = prune_model(src, "mone", tmp_path / "o", ratio=0.5, calib=str(calib_file), compensate="lowrank",
                      compensate_rank=r, **PRUNE)
    plan = Plan.load(out / "moeprune_plan.json")
    assert plan.compensation["fit"] == "lowrank" and plan.compensation["rank"] == r
    notes = {lp.layer: lp.notes["compensation"] for lp in plan.layers}
    applied = [i for i, n in notes.items() if n["applied"]]
    assert applied, notes
    assert all(n["novice_rank"] == r for n in notes.values())

    loaded = moeprune.from_pretrained(out)
    adapter = get_adapter(loaded.config)
    blocks = adapter.moe_blocks(loaded)
    for i in blocks:  # a layer whose fit was refused keeps constant novices
        ex = adapter.experts(blocks[i])
        assert has_low_rank_novices(ex) == (i in applied)
        if i in applied:
            assert ex.novice_u.shape == (len(plan.layer(i).novices), adapter.expert_dim, r)

    in_memory = moeprune.from_pretrained(src)
    layers, _ = decoder_layers(in_memory)
    for i, layer in snapshots.items():
        layers[i] = layer
    ids = torch.randint(3, 400, (2, 16))
    with torch.no_grad():
        want = in_memory(ids, output_hidden_states=True)
        got = loaded(ids, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states)
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(got.logits, want.logits)

    counts = checkpoint_parameters(out)
    n_novices = sum(len(lp.novices) for lp in plan.layers)
    H = adapter.expert_dim
    assert counts["novices"] == n_novices * H + len(applied) * len(plan.layers[0].novices) * 2 * H * r
    assert counts == parameter_counts(loaded)
    card = (out / "README.md").read_text()
    assert "Low-rank novices" in card and "novices (vectors, low-rank factors)" in card
    assert moeprune.inspect(out)["parameters"]["novices"] == counts["novices"]

    stock_dir = moeprune.export_stock(out, tmp_path / "stock")
    import transformers as tf

    stock = tf.AutoModelForCausalLM.from_pretrained(stock_dir)
    assert torch.isfinite(stock(ids).logits).all()
    assert checkpoint_parameters(stock_dir)["novices"] == 0


def test_llama4_refuses_low_rank_novices_in_one_line():
    """Llama 4's dense novice forward runs on score-scaled inputs, where b + U Vᵀx is not defined."""
    model, adapter, block, constant, lp = _mone_block("llama4_text")
    with pytest.raises(MoepruneError, match="low-rank") as e:
        model(torch.randint(3, 100, (1, 8)))
    assert "\n" not in str(e.value)


def test_the_novice_file_is_format_2_only_with_low_rank_novices(tmp_path):
    """Constant novices keep format 1 (older moeprune reads them); low-rank ones write format 2, which older
    moeprune refuses instead of loading constant novices in their place."""
    import json

    import moeprune
    from moeprune.store.checkpoint import save_checkpoint

    for low_rank in (False, True):
        torch.manual_seed(0)
        model = tiny_model("mixtral")
        adapter = get_adapter(model.config)
        E, H = adapter.num_experts, adapter.expert_dim
        layers = []
        for i, block in adapter.moe_blocks(model).items():
            lp = LayerPlan(layer=i, num_experts_in=E, groups=[Group([e], [1.0]) for e in (1, 3)],
                           novices=[e for e in range(E) if e not in (1, 3)])
            apply_layer_plan(adapter, block, lp, torch.randn(E - 2, H))
            if low_rank:
                make_low_rank_novices(adapter, block, torch.zeros(E - 2, H), torch.randn(E - 2, H, 2),
                                      torch.randn(E - 2, H, 2))
            layers.append(lp)
        plan = Plan(method="mone", layers=layers, model={"top_k": 2, "num_experts": E})
        out = save_checkpoint(model, tmp_path / str(low_rank), source="tiny-mixtral", plan=plan,
                              before=parameter_counts(model))
        section = json.loads((out / "config.json").read_text())["moeprune_novice"]
        assert section["format"] == (2 if low_rank else 1)
        ids = torch.randint(3, 100, (2, 8))
        with torch.no_grad():
            assert torch.equal(moeprune.from_pretrained(out)(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_cli_compensate_lowrank_and_its_rank(checkpoint, calib_file, tmp_path, capsys):
    import moeprune
    from moeprune.cli import main

    src = checkpoint("mixtral")
    common = ["--method", "mone", "--calib", str(calib_file), "--samples", "16", "--seq-len", "32",
              "--ratio", "0.5"]
    assert main(["prune", str(src), "--out", str(tmp_path / "never"), *common, "--compensate", "down",
                 "--compensate-rank", "4"]) != 0
    err = capsys.readouterr().err
    assert "--compensate-rank 4 sets the rank of low-rank novices" in " ".join(err.split())
    assert not (tmp_path / "never").exists()
    assert main(["prune", str(src), "--out", str(tmp_path / "o"), *common, "--compensate", "lowrank",
                 "--compensate-rank", "2"]) == 0
    model = moeprune.from_pretrained(tmp_path / "o")
    adapter = get_adapter(model.config)
    ranks = {adapter.experts(b).novice_u.shape[2] for b in adapter.moe_blocks(model).values()
             if has_low_rank_novices(adapter.experts(b))}
    assert ranks == {2}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "o")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "low-rank" in shown and "in novices" in shown  # the table wraps long cells
