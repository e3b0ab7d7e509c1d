"""The observed forward is the model's own forward, bit for bit, and the statistics' buffer reuse is exact.

The observer follows transformers' grouped_mm experts forward step for step (to keep the raw
outputs it computes instead of running the experts twice); these tests catch any drift from it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import token_ids

from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model
from moeprune.observe import Observer, probe_positions
from moeprune.observe.hooks import grouped_mm_steps
from moeprune.observe.stats import ExpertStats

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "phimoe",
            "gpt_oss", "ernie4_5_moe", "llama4_text"]


@torch.no_grad()
def _plain_and_observed(model, adapter, blocks, ids):
    """(plain logits, logits with the observer attached, the observer) on ids [B, L]."""
    plain = model(input_ids=ids, use_cache=False).logits
    with Observer(adapter, blocks, probe_positions(ids.numel(), 8, 0)) as obs:
        obs.begin_batch(torch.arange(ids.numel()))
        observed = model(input_ids=ids, use_cache=False).logits
    return plain, observed, obs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_observed_forward_equals_plain_forward(family, top_k):
    model = tiny_model(family, top_k=top_k)
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    if family != "llama4_text":  # every grouped_mm family takes the step-for-step path
        assert all(grouped_mm_steps(adapter.experts(b)) is not None for b in blocks.values())
    ids = token_ids(3, 24)
    plain, observed, obs = _plain_and_observed(model, adapter, blocks, ids)
    assert torch.equal(observed, plain)
    for i in blocks:  # every token was recorded K times (Phi-MoE's sparsemixer always routes to 2)
        assert float(obs.experts[i].count.sum()) == ids.numel() * (2 if family == "phimoe" else top_k)


def test_eager_experts_take_the_generic_path():
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("eager")
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    assert all(grouped_mm_steps(adapter.experts(b)) is None for b in blocks.values())
    plain, observed, _ = _plain_and_observed(model, adapter, blocks, token_ids(2, 16))
    torch.testing.assert_close(observed, plain)


def test_update_with_scratch_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    S, H, E = 300, 16, 5
    ids = torch.randint(0, E, (S,), generator=g)
    gates = torch.rand(S, generator=g)
    # a large mean: deviations must be taken, not sums of squares
    outs = torch.randn(S, H, generator=g) * 3 + 100
    a, b = ExpertStats(E, H), ExpertStats(E, H)
    for chunk in (slice(0, 120), slice(120, S)):
        n = chunk.stop - chunk.start
        a.update(ids[chunk], gates[chunk], outs[chunk].clone())
        b.update(ids[chunk], gates[chunk], outs[chunk].clone(), scratch=torch.full((n, H), float("nan")))
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k
    ref = torch.stack([outs[ids == e].double().var(0) for e in range(E)])
    torch.testing.assert_close(a.var, ref, rtol=1e-4, atol=1e-6)
