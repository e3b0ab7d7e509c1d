"""`moeprune eval` on pruned multimodal checkpoints as they ship: text perplexity, layer by layer and with the
whole model loaded, on the checkpoint written as its own vision-language (or omni) class."""

from __future__ import annotations

import math

import pytest
from helpers import manual_plan

from moeprune import api
from moeprune.arch.tiny import save_tiny_checkpoint
from moeprune.evaluation import evaluate_models

KEEP = [0, 1, 4, 5]  # two per routing group where there are two groups
MULTIMODAL = ["qwen3_vl_moe", "glm4v_moe", "gemma4", "qwen3_omni_moe", "llama4", "kimi_k25", "mistral3",
              "qwen3_5_moe", "minimax_m3_vl"]


@pytest.mark.parametrize("model_type", [
    pytest.param(mt, marks=() if mt == "qwen3_vl_moe" else pytest.mark.slow) for mt in MULTIMODAL])
def test_eval_gives_text_perplexity_on_a_pruned_multimodal_checkpoint(model_type, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = save_tiny_checkpoint(model_type, src)
    api.apply_checkpoint(src, manual_plan(model, keep=KEEP), out, layerwise=True, progress=False)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, and then it naps. " * 60)

    def ppl(layerwise):
        report = evaluate_models([src, out], [text], seq_len=32, max_tokens=256, batch_size=4,
                                 layerwise=layerwise)
        return [m["perplexity"][str(text)]["ppl"] for m in report["models"]]

    walked, whole = ppl(True), ppl(False)
    assert all(math.isfinite(p) and p > 1 for p in walked)
    assert walked != [walked[0]] * 2, "pruning half the experts left the perplexity unchanged"
    # the layer-by-layer walk computes what the whole model computes
    assert walked == pytest.approx(whole, rel=1e-4)
