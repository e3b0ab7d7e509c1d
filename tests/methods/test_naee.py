"""NAEE: the fast subset scorer equals the block output; the search finds a planted best subset."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import observed as _observed

from moeprune import api
from moeprune.arch import get_adapter
from moeprune.arch.tiny import TINY_FAMILIES, tiny_model
from moeprune.methods.naee import SubsetScorer
from moeprune.pipeline.access import ModelWeights

# ---- NAEE ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_naee_fast_path_matches_block_output(family):
    """The lookup evaluation equals surgery + the block's own forward, or the layer falls back."""
    model = tiny_model(family)
    weights = ModelWeights(model)
    layer = weights.layers()[0]
    x = torch.randn(48, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    scorer = SubsetScorer(weights.layer(layer), x, check_subsets=[])
    if family == "llama4_text":  # experts take score-scaled inputs: no lookup possible
        assert scorer.mode == "block_output" and "cannot run" in scorer.reason
        return
    assert scorer.mode == "fast", scorer.reason
    # DeepSeek-V3's tiny config has two routing groups (0-3, 4-7): keep two of each
    subsets = [s for s in itertools.combinations(range(8), 4)
               if family != "deepseek_v3" or sum(e < 4 for e in s) == 2]
    for subset in subsets[::7]:
        assert abs(scorer.fast_error(subset) - scorer.block_error(subset)) <= 1e-5 * scorer.z_norm


@pytest.mark.parametrize("max_exhaustive,search", [(5000, "exhaustive"), (0, "greedy")])
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_naee_finds_the_planted_best_subset(family, max_exhaustive, search):
    """Experts that the router can never pick cost nothing to remove; every other removal costs something."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    never = [5, 6, 7] if family == "gpt_oss" else [3, 7]  # one per routing group for DeepSeek-V3
    with torch.no_grad():
        for block in adapter.moe_blocks(model).values():
            router = adapter.router(block)
            bias = router.bias if family == "gpt_oss" else router.e_score_correction_bias
            bias[never] = -100.0
    stats = _observed(model)
    keep = 8 - len(never)
    plan = api.make_plan_for(stats, "naee", experts=keep, weights=ModelWeights(model),
                             options={"max_exhaustive": max_exhaustive})
    for lp in plan.layers:
        assert lp.kept == [e for e in range(8) if e not in never]
        assert lp.notes["search"] == search and lp.notes["evaluation"] == "fast"
        assert lp.notes["error"] == pytest.approx(0, abs=1e-6)
    # and it is not the trivial answer: dropping a routable expert instead costs something
    scorer = SubsetScorer(ModelWeights(model).layer(plan.layers[0].layer),
                          stats.layers[plan.layers[0].layer].probe.inputs)
    alternative = [e for e in range(8) if e not in never and e != 0] + [never[0]]
    assert scorer(sorted(alternative)) > 1e-3
