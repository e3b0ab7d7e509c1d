"""MoNE: the method, novices in memory for every family, novice checkpoints and their stock export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

import moeprune
from moeprune.api import make_plan_for
from moeprune.arch import get_adapter
from moeprune.arch.families import Llama4Text
from moeprune.arch.tiny import TINY_FAMILIES, save_tiny_checkpoint, tiny_model
from moeprune.cli import _parse_options, main
from moeprune.errors import MoepruneError
from moeprune.methods.mone import novice_vectors
from moeprune.observe import ExpertStats, LayerStats, Probe, Stats, observe
from moeprune.plan import Group, LayerPlan, Plan
from moeprune.store.checkpoint import load_config, load_model, parameter_counts, save_checkpoint
from moeprune.store.files import weights_bytes
from moeprune.store.novices import NOVICE_FILE
from moeprune.surgery import apply_plan
from moeprune.surgery.novices import apply_novice_layer

# DeepSeek-V3's tiny config routes with 2 groups; these tests run it ungrouped (groups:
# tests/methods/test_group_novices.py)
OVERRIDES = {"deepseek_v3": {"n_group": 1, "topk_group": 1}}


def _ids(seed: int = 0, batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def _mone(family: str, ratio: float = 0.25, **options):
    """(original model, stats, plan, pruned model) for a tiny `family` model."""
    model = tiny_model(family, **OVERRIDES.get(family, {}))
    stats = observe(model, _ids(), batch_size=2, probe_size=16)
    plan = make_plan_for(stats, "mone", ratio=ratio, options=options)
    pruned = apply_plan(copy.deepcopy(model), plan, stats=stats)
    return model, stats, plan, pruned


# ---- statistics and the method ----------------------------------------------------------------
def test_streaming_variance_equals_two_pass():
    torch.manual_seed(0)
    E, H, S = 5, 7, 400
    ids = torch.randint(0, E - 1, (S,))  # expert E-1 is never routed
    gates = torch.rand(S)
    outs = torch.randn(S, H) * 3 + 1
    st = ExpertStats(E, H)
    for chunk in torch.tensor_split(torch.arange(S), [37, 150, 151, 300]):  # uneven batches, one of 1 row
        st.update(ids[chunk], gates[chunk], outs[chunk])
    for e in range(E):
        rows = outs[ids == e].double()
        assert st.count[e] == rows.shape[0]
        if rows.shape[0] < 2:
            assert torch.all(st.var[e] == 0)
            continue
        torch.testing.assert_close(st.mean[e], rows.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.var[e], torch.var(rows, dim=0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.gate_sum[e], gates[ids == e].double().sum(), rtol=1e-6, atol=1e-6)


def _synthetic_stats(layers=(0, 1), N=100) -> Stats:
    """Six experts per layer with chosen frequency and spread (H = 4, top-2).

    expert:                  0     1     2     3     4     5
    gate_sum / N:            0.4   0.01  0.2   0.2   0.05  0  (never routed)
    ||std||_2 = 2 std:       0.2   10    2     4     6     0
    phi = product:           0.08  0.1   0.4   0.8   0.3   0
    """
    E, H = 6, 4
    count = torch.tensor([50.0, 5, 30, 30, 10, 0])
    gate_sum = torch.tensor([40.0, 1, 20, 20, 5, 0])
    std = torch.tensor([0.1, 5, 1, 2, 3, 0])
    out = {}
    for i in layers:
        st = ExpertStats(E, H)
        st.count = count.double()
        st.gate_sum = gate_sum.double()
        st.mean = torch.arange(E * H, dtype=torch.float64).view(E, H) + 1  # nonzero everywhere
        st.m2 = ((std**2)[:, None] * (count - 1).clamp(min=0)[:, None]).expand(E, H).double().clone()
        out[i] = LayerStats(i, st, Probe(torch.zeros(0, dtype=torch.long), torch.zeros(0, H),
                                         torch.zeros(0, E)))
    model = {"model_type": "mixtral", "num_experts": E, "top_k": 2, "n_group": 1, "min_experts_per_group": 2,
             "hidden_size": H, "moe_layers": list(layers)}
    return Stats(model=model, calibration={"tokens": N, "sha256": "abc"}, layers=out)


def test_phi_ranking_picks_expected_experts():
    stats = _synthetic_stats()
    plan = make_plan_for(stats, "mone", experts=3)
    lp = plan.layers[0]
    assert lp.kept == [2, 3, 4] and lp.novices == [0, 1, 5]
    assert lp.notes["never_routed"] == [5]
    assert lp.notes["novice_vectors"] == "out_mean"
    phi = torch.tensor(lp.notes["scores"])
    torch.testing.assert_close(phi, torch.tensor([0.08, 0.1, 0.4, 0.8, 0.3, 0.0], dtype=phi.dtype))
    # the ablations rank by one factor only; frequency ties (2 = 3) are both kept here
    assert make_plan_for(stats, "mone", experts=3,
                         options={"ranking": "variance"}).layers[0].kept == [1, 3, 4]
    assert make_plan_for(stats, "mone", experts=3,
                         options={"ranking": "frequency"}).layers[0].kept == [0, 2, 3]
    assert make_plan_for(stats, "mone", experts=2,
                         options={"ranking": "frequency"}).layers[0].kept == [0, 2]  # tie: lower id
    vectors = novice_vectors(plan, stats)[0]
    assert torch.equal(vectors[:2], stats.layers[0].experts.mean[[0, 1]])
    assert torch.all(vectors[2] == 0)  # never routed -> zero novice


def test_novice_false_gives_zero_vectors_and_needs_no_stats():
    stats = _synthetic_stats()
    options = _parse_options("mone", ["novice=false"])
    assert options == {"novice": False}
    plan = make_plan_for(stats, "mone", experts=3, options=options)
    assert plan.method_config["novice"] is False
    assert all(lp.notes["novice_vectors"] == "zero" for lp in plan.layers)
    for v in novice_vectors(plan, None).values():  # no stats needed for zero novices
        assert v.shape == (3, 4) and torch.all(v == 0)
    with pytest.raises(MoepruneError, match="--stats"):
        novice_vectors(make_plan_for(stats, "mone", experts=3), None)


def test_bad_options_and_mismatched_stats_are_refused():
    stats = _synthetic_stats()
    with pytest.raises(MoepruneError, match="ranking"):
        make_plan_for(stats, "mone", experts=3, options={"ranking": "entropy"})
    plan = make_plan_for(stats, "mone", experts=3)
    other = _synthetic_stats()
    other.calibration["sha256"] = "def"
    with pytest.raises(MoepruneError, match="do not match the plan"):
        novice_vectors(plan, other)


def test_global_scope_ranks_across_layers():
    stats = _synthetic_stats()
    # identical layers: same counts everywhere
    even = make_plan_for(stats, "mone", experts=3, options={"scope": "global"})
    assert ([lp.kept for lp in even.layers]
            == [lp.kept for lp in make_plan_for(stats, "mone", experts=3).layers])
    # layer 1 is far less redundant: a global ranking prunes layer 0 more
    stats.layers[1].experts.gate_sum *= 10
    with pytest.raises(MoepruneError, match=r"scope=global would keep different expert counts .*0: 1, 1: 5"):
        make_plan_for(stats, "mone", experts=3, options={"scope": "global"})


def test_novices_with_group_limited_routing_plan_with_or_without_flattening(tmp_path):
    # changed on purpose: they used to be refused without --flatten-groups; the router keeps all E rows,
    # so group-limited routing is unchanged (tests/methods/test_group_novices.py)
    model = tiny_model("deepseek_v3")  # n_group=2
    stats = observe(model, _ids(batch=2), batch_size=2, probe_size=8)
    grouped = make_plan_for(stats, "mone", experts=5)  # an odd count: no pruning method could keep it
    assert not grouped.flatten_groups and len(grouped.layers[0].novices) == 3
    flat = make_plan_for(stats, "mone", experts=6, flatten_groups=True)
    assert flat.flatten_groups and flat.layers[0].novices


# ---- novices in memory ------------------------------------------------------------------------
def test_novice_output_is_gate_times_mean_at_block_level():
    model = tiny_model("mixtral")
    adapter = get_adapter(model.config)
    layer, block = next(iter(adapter.moe_blocks(model).items()))
    original = copy.deepcopy(block)
    kept, novices = [2, 5], [0, 1, 3, 4, 6, 7]  # keep exactly top-k: many tokens route to novices only
    vectors = torch.randn(len(novices), 64, dtype=torch.float64)
    lp = LayerPlan(layer=layer, num_experts_in=8, groups=[Group([e], [1.0]) for e in kept], novices=novices)
    apply_novice_layer(adapter, block, lp, vectors)
    ex = adapter.experts(block)
    assert ex.gate_up_proj.shape[0] == 2 and ex.num_experts == 2  # experts really shrink
    assert adapter.router(block).weight.shape[0] == 8  # the router keeps every row
    seen = []
    ex.register_forward_pre_hook(lambda module, args: seen.append(args))
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = block(x)
    out = (out[0] if isinstance(out, tuple) else out).reshape(40, 64)
    _, idx, w = seen[0]  # router ids [T, K] and gates [T, K] as the experts received them
    by_id = dict(zip(novices, vectors.float()))
    expected = torch.zeros(40, 64)
    for t in range(40):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e in by_id:
                expected[t] += w[t, k] * by_id[e]
            else:
                expected[t] += w[t, k] * adapter.expert_outputs(original, x[0, t : t + 1],
                                                                idx[t, k : k + 1])[0]
    only_novices = torch.tensor([all(int(e) in by_id for e in row) for row in idx])
    assert only_novices.sum() >= 5
    torch.testing.assert_close(out[only_novices], expected[only_novices], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _reference(model, plan, vectors):
    """The original model whose novice experts output their vector instead (computed independently)."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref.config)
    blocks = adapter.moe_blocks(ref)
    for lp in plan.layers:
        block, ex = blocks[lp.layer], adapter.experts(blocks[lp.layer])
        by_id = {e: v.float() for e, v in zip(lp.novices, vectors[lp.layer])}
        if isinstance(adapter, Llama4Text):
            scores = {}
            adapter.router(block).register_forward_hook(lambda m, a, o, s=scores: s.__setitem__("s", o[0]))

            def forward(routed_in, ex=ex, by_id=by_id, scores=scores):
                s = scores["s"]  # [T, E]
                out = type(ex).forward(ex, routed_in).view(s.shape[1], s.shape[0], -1).clone()
                for e, v in by_id.items():
                    out[e] = (s[:, e] > 0)[:, None].float() * v
                return out.view(-1, out.shape[-1])
        else:
            def forward(hidden, top_k_index, top_k_weights, block=block, by_id=by_id, adapter=adapter):
                T, K = top_k_index.shape
                flat = top_k_index.reshape(-1)
                # [T*K, H]
                raw = adapter.expert_outputs(block, hidden.repeat_interleave(K, dim=0), flat).clone()
                for e, v in by_id.items():
                    raw[flat == e] = v
                return (raw.view(T, K, -1) * top_k_weights[..., None].float()).sum(1).to(hidden.dtype)
        ex.forward = forward
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_novices_every_family(family, tmp_path):
    model, stats, plan, pruned = _mone(family)
    adapter = get_adapter(pruned.config)
    E = adapter.num_experts
    for block in adapter.moe_blocks(pruned).values():
        ex = adapter.experts(block)
        assert ex.gate_up_proj.shape[0] == 6 and ex.down_proj.shape[0] == 6  # compact, not zeroed
        assert all(getattr(o, n).shape[a] == E == 8 for o, n, a in adapter.router_expert_tensors(block))
    routed = sum(float(stats.layers[lp.layer].experts.count[lp.novices].sum()) for lp in plan.layers)
    assert routed > 0  # the calibration tokens do reach the novices, so the comparison below is not vacuous
    ids = _ids()
    with torch.no_grad():
        got = pruned(ids).logits
        want = _reference(model, plan, novice_vectors(plan, stats))(ids).logits
        again = copy.deepcopy(pruned)(ids).logits  # deepcopy keeps the novices (bound methods, hooks)
        original = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, again)
    assert not torch.allclose(got, original, atol=1e-4)
    counts = parameter_counts(pruned)
    assert counts["novices"] == len(plan.layers) * 2 * 64
    assert counts["routed_experts"] == parameter_counts(model)["routed_experts"] * 6 // 8
    # the checkpoint round trip is exact, and stock transformers refuses the checkpoint
    out = save_checkpoint(pruned, tmp_path / "mone", source=f"tiny-{family}", plan=plan,
                          before=parameter_counts(model))
    with torch.no_grad():
        assert torch.equal(moeprune.from_pretrained(out)(ids).logits, got)
    with pytest.raises(ValueError, match=r"load it with moeprune\.from_pretrained"):
        tf.AutoModelForCausalLM.from_pretrained(out)


def test_plan_that_pruned_nothing_gives_identical_logits(tmp_path):
    model, _, plan, pruned = _mone("qwen2_moe", ratio=0.0)
    assert all(not lp.novices and len(lp.groups) == 8 for lp in plan.layers)
    ids = _ids(1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, pruned(ids).logits)
    src = tmp_path / "src"
    save_tiny_checkpoint("qwen2_moe", src)
    out = save_checkpoint(pruned, tmp_path / "out", source=str(src), plan=plan,
                          before=parameter_counts(model))
    assert not (out / NOVICE_FILE).exists()  # nothing to store: a plain stock checkpoint
    with torch.no_grad():
        assert torch.equal(moeprune.from_pretrained(out)(ids).logits, model(ids).logits)
        assert torch.equal(tf.AutoModelForCausalLM.from_pretrained(out)(ids).logits, model(ids).logits)


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "llama4_text"])
def test_checkpoint_round_trip_stock_refusal_and_export(family, tmp_path):
    overrides = OVERRIDES.get(family, {})
    src = tmp_path / "src"
    save_tiny_checkpoint(family, src, **overrides)
    model = moeprune.from_pretrained(src)  # a stock checkpoint loads too
    stats = observe(model, _ids(), batch_size=2, probe_size=16)
    plan = make_plan_for(stats, "mone", ratio=0.25)
    pruned = apply_plan(copy.deepcopy(model), plan, stats=stats)
    out = save_checkpoint(pruned, tmp_path / "mone", source=str(src), plan=plan,
                          before=parameter_counts(model))
    ids = _ids(2)

    loaded = moeprune.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)

    # stock transformers refuses the model, pointing at moeprune (config.json's model_type says so), while
    # the tokenizer still loads stock
    with pytest.raises(ValueError, match=r"load it with moeprune\.from_pretrained"):
        tf.AutoModelForCausalLM.from_pretrained(out)
    assert tf.AutoTokenizer.from_pretrained(out)("the fox")["input_ids"]
    # moeprune's own loaders (used by `eval`) handle it; observing or pruning it again is refused
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids).logits, pruned(ids).logits)
    assert get_adapter(load_config(out)).num_experts == 8
    with pytest.raises(MoepruneError, match="export-stock"):
        moeprune.observe_checkpoint(out, "unused.txt")
    with pytest.raises(MoepruneError, match="novices"):
        apply_plan(loaded, plan, stats=stats)

    # accounting: novices counted, bytes on disk are the files'
    info = moeprune.inspect(out)
    n_layers = len(plan.layers)
    assert info["parameters"]["novices"] == n_layers * 2 * 64
    assert info["parameters"] == parameter_counts(pruned)
    assert info["novices"]["experts_kept"] == 6 and info["novices"]["router_experts"] == 8
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    card = (out / "README.md").read_text()
    assert "novice vectors" in card and "moeprune.from_pretrained" in card and "bytes on disk" in card

    # export-stock: plain pruning of the same experts, loadable with stock transformers
    stock_dir = moeprune.export_stock(out, tmp_path / "stock")
    stock = tf.AutoModelForCausalLM.from_pretrained(stock_dir)
    plain = Plan(method="frequency", model=plan.model, calibration=plan.calibration,
                 layers=[LayerPlan(lp.layer, lp.num_experts_in, lp.groups) for lp in plan.layers])
    expected = apply_plan(copy.deepcopy(model), plain)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, expected(ids).logits)
    assert weights_bytes(stock_dir) < weights_bytes(out) < weights_bytes(src)
    exported = Plan.load(stock_dir / "moeprune_plan.json")
    assert all(not lp.novices and lp.notes["novices_exported_as_pruned"] for lp in exported.layers)
    assert "Exported without novices" in (stock_dir / "README.md").read_text()
    with pytest.raises(MoepruneError, match="already a stock checkpoint"):
        moeprune.export_stock(stock_dir, tmp_path / "again")


def test_cli_prune_novice_false_inspect_apply_and_export(tmp_path, capsys):
    src = tmp_path / "src"
    save_tiny_checkpoint("olmoe", src)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}."
                              for i in range(400)))
    # compensation off: the checkpoint is compared with `apply`'s, which does not refit
    common = ["--calib", str(calib), "--samples", "4", "--seq-len", "32", "--ratio", "0.25",
              "--compensate", "none"]
    assert main(["prune", str(src), "--method", "mone", "--out", str(tmp_path / "zero"), *common,
                 "--option", "novice=false"]) == 0
    zero = moeprune.from_pretrained(tmp_path / "zero")
    adapter = get_adapter(zero.config)
    assert all(torch.all(adapter.experts(b).novice_vectors == 0) for b in adapter.moe_blocks(zero).values())
    config = json.loads((tmp_path / "zero" / "config.json").read_text())
    assert config["moeprune_novice"]["num_experts_kept"] == 6

    # observe -> plan -> apply --stats gives the same checkpoint as prune
    assert main(["observe", str(src), "--calib", str(calib), "--samples", "4", "--seq-len", "32",
                 "--out", str(tmp_path / "stats")]) == 0
    assert main(["plan", str(tmp_path / "stats"), "--method", "mone", "--ratio", "0.25",
                 "--out", str(tmp_path / "plan.json")]) == 0
    assert main(["apply", str(src), str(tmp_path / "plan.json"), "--out", str(tmp_path / "nostats")]) == 2
    assert "--stats" in capsys.readouterr().err
    assert main(["apply", str(src), str(tmp_path / "plan.json"), "--stats", str(tmp_path / "stats"),
                 "--out", str(tmp_path / "mone")]) == 0
    assert main(["prune", str(src), "--method", "mone", "--out", str(tmp_path / "mone2"), *common]) == 0
    ids = _ids(3)
    with torch.no_grad():
        a = moeprune.from_pretrained(tmp_path / "mone")(ids).logits
        b = moeprune.from_pretrained(tmp_path / "mone2")(ids).logits
        c = zero(ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "mone")]) == 0
    shown = capsys.readouterr().out
    assert "novice vectors" in shown and "bytes on disk" in shown and "moeprune.from_pretrained" in shown
    assert main(["export-stock", str(tmp_path / "mone"), "--out", str(tmp_path / "stock")]) == 0
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path / "stock").config.num_experts == 6
    assert main(["export-stock", str(src), "--out", str(tmp_path / "x")]) == 2
