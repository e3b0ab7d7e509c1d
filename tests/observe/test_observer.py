"""The observer against a naive per-token reference, across batch splits; stats I/O; hook hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_FAMILIES, token_ids

from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.observe import Observer, Stats, observe, probe_positions

N, L = 8, 32  # calibration sequences x tokens
PROBE = 40


def _calibration() -> torch.Tensor:
    return token_ids(N, L, seed=7)  # [N, L]


def _expert_raw(adapter, block, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's raw output on one token x [H], from its weight views, by explicit matmuls."""
    w = adapter.expert_weights(block, e)
    gate = w.gate @ x + (w.gate_bias if w.gate_bias is not None else 0)  # [I]
    up = w.up @ x + (w.up_bias if w.up_bias is not None else 0)  # [I]
    if adapter.family == "gpt_oss":  # clamped SwiGLU with (up + 1)
        ex = adapter.experts(block)
        gate = gate.clamp(max=ex.limit)
        up = up.clamp(min=-ex.limit, max=ex.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * ex.alpha))
    else:
        assert adapter.config.hidden_act == "silu"
        h = F.silu(gate) * up
    return w.down @ h + (w.down_bias if w.down_bias is not None else 0)  # [H]


@torch.no_grad()
def _reference(model, input_ids: torch.Tensor) -> dict[int, dict]:
    """Per MoE layer: count, gate_sum, mean, var, reap_sum, ean_sum by a per-token loop.

    Routing is the router's own output in one forward over all sequences: (logits, weights, indices)
    for most families; Llama 4's router returns (scores, logits), and its experts see sigmoid(score) * x.
    """
    adapter = get_adapter(model.config)
    E, K, H = adapter.num_experts, adapter.top_k, model.config.hidden_size
    blocks = adapter.moe_blocks(model)
    seen: dict[int, tuple] = {}
    handles = [adapter.router(b).register_forward_hook(
        lambda m, args, out, i=i: seen.__setitem__(i, (args[0].reshape(-1, H).clone(), out)))
        for i, b in blocks.items()]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for i, block in blocks.items():
        x, out = seen[i]
        if len(out) == 3:
            weights, index = out[1], out[2]  # [T, K]
        else:
            scores, logits = out
            index = logits.topk(K, dim=-1).indices
            weights = scores.gather(1, index)
        outputs: dict[int, list[torch.Tensor]] = {e: [] for e in range(E)}
        gate_sum = torch.zeros(E, dtype=torch.float64)
        reap_sum = torch.zeros(E, dtype=torch.float64)
        ean_sum = torch.zeros(E, dtype=torch.float64)
        for t in range(x.shape[0]):
            for k in range(K):
                e, g = int(index[t, k]), float(weights[t, k])
                inp = x[t] * g if adapter.family == "llama4_text" else x[t]
                raw = _expert_raw(adapter, block, e, inp).double()
                norm = float(raw.norm())
                outputs[e].append(raw)
                gate_sum[e] += g
                reap_sum[e] += g * norm
                ean_sum[e] += norm
        count = torch.tensor([len(outputs[e]) for e in range(E)], dtype=torch.float64)
        mean = torch.stack([torch.stack(o).mean(0) if o else torch.zeros(H, dtype=torch.float64)
                            for o in outputs.values()])
        var = torch.stack([torch.stack(o).var(0, unbiased=True) if len(o) > 1
                           else torch.zeros(H, dtype=torch.float64) for o in outputs.values()])
        result[i] = {"count": count, "gate_sum": gate_sum, "reap_sum": reap_sum, "ean_sum": ean_sum,
                     "mean": mean, "var": var, "inputs": x, "T": x.shape[0]}
    return result


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


OBSERVED_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                     "phimoe", "gpt_oss", "ernie4_5_moe", "llama4_text"]


@pytest.mark.parametrize("family", OBSERVED_FAMILIES)
def test_observer_matches_per_token_reference_for_any_batch_split(family):
    model = tiny_model(family)
    ids = _calibration()
    ref = _reference(model, ids)
    probes = []
    for batch_size in (1, 3, N):
        stats = observe(model, ids, batch_size=batch_size, probe_size=PROBE, seed=5)
        assert sorted(stats.layers) == sorted(ref)
        assert stats.num_tokens == N * L and stats.calibration["probe_size"] == PROBE
        for i, r in ref.items():
            ex = stats.layers[i].experts
            where = f"{family} layer {i} batch {batch_size}"
            assert torch.equal(ex.count, r["count"]), where
            assert float(ex.count.sum()) == r["T"] * model.config.num_experts_per_tok
            for key in ("gate_sum", "reap_sum", "ean_sum", "mean", "var"):
                _close(getattr(ex, key), r[key], f"{where} {key}")
            assert ex.var.dtype == torch.float64 and ex.mean.dtype == torch.float64
        probes.append({i: ls.probe for i, ls in stats.layers.items()})

    # the probe is the same seeded sample of tokens whatever the batch size, and holds the MoE inputs
    wanted = probe_positions(N * L, PROBE, 5)
    for i, r in ref.items():
        first = probes[0][i]
        assert torch.equal(first.positions, wanted)
        _close(first.inputs, r["inputs"][wanted].float(), f"{family} probe inputs")
        assert first.router_logits.shape == (PROBE, 8)
        for other in probes[1:]:
            assert torch.equal(other[i].positions, first.positions)
            torch.testing.assert_close(other[i].inputs, first.inputs, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other[i].router_logits, first.router_logits, rtol=1e-5, atol=1e-6)


def test_statistics_are_nontrivial():
    """Guard against a reference and an observer that agree because both see nothing."""
    model = tiny_model("mixtral")
    stats = observe(model, _calibration(), batch_size=4, probe_size=PROBE)
    for ls in stats.layers.values():
        ex = ls.experts
        assert (ex.count > 1).sum() >= 6
        assert (ex.var > 0).any() and (ex.mean != 0).any()
        assert (ex.reap_sum < ex.ean_sum).all()  # gates are < 1 after renormalisation over top-2
        torch.testing.assert_close(ex.gate_sum.sum(), torch.tensor(float(N * L), dtype=torch.float64))


def test_stats_save_load_round_trip(tmp_path):
    model = tiny_model("gpt_oss")
    stats = observe(model, _calibration(), batch_size=3, probe_size=PROBE, seed=1,
                    calibration={"source": "unit-test", "sha256": "ab" * 32})
    stats.save(tmp_path / "stats")
    loaded = Stats.load(tmp_path / "stats")
    assert loaded.model == stats.model
    assert loaded.calibration == stats.calibration
    assert loaded.version == stats.version
    assert sorted(loaded.layers) == sorted(stats.layers)
    for i, ls in stats.layers.items():
        got = loaded.layers[i]
        assert got.layer == i
        for key, tensor in ls.experts.tensors().items():
            assert torch.equal(getattr(got.experts, key), tensor), key
            assert getattr(got.experts, key).dtype == tensor.dtype
        assert torch.equal(got.experts.var, ls.experts.var)
        for key in ("positions", "inputs", "router_logits"):
            assert torch.equal(getattr(got.probe, key), getattr(ls.probe, key)), key


@ALL_FAMILIES
def test_hooks_are_removed_after_observing(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
    observe(model, _calibration()[:2], batch_size=2, probe_size=8)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    for block in adapter.moe_blocks(model).values():
        assert "forward" not in adapter.experts(block).__dict__
        for module in block.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_are_removed_when_the_pass_fails():
    model = tiny_model("llama4_text")
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    with pytest.raises(RuntimeError, match="boom"), Observer(adapter, blocks, torch.arange(4)) as obs:
        obs.begin_batch(torch.arange(16))
        with torch.no_grad():
            model(token_ids(1, 16))
        assert all("forward" in adapter.experts(b).__dict__ for b in blocks.values())
        raise RuntimeError("boom")
    for block in blocks.values():
        assert "forward" not in adapter.experts(block).__dict__
        assert not adapter.router(block)._forward_hooks
