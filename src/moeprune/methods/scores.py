"""Pruning by a per-expert score: keep the `r` highest-scoring experts of every MoE layer.

The kept experts' router rows stay as they are and top-k is unchanged. With group-limited
routing (DeepSeek-V3, GLM-4 MoE), each routing group keeps the same number of experts, chosen
inside the group, so the output still satisfies `E % n_group == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.methods import options
from moeprune.methods.groups import top_experts
from moeprune.methods.registry import NoOptions, PlanRequest, register
from moeprune.observe.stats import ExpertStats
from moeprune.plan import Group, LayerPlan, Plan


def plan_from_scores(request: PlanRequest, method: str, score_fn) -> Plan:
    """A pruning plan keeping, per layer, the experts with the highest `score_fn(layer_stats)`."""
    layers = []
    for i, ls in sorted(request.stats.layers.items()):
        scores = score_fn(ls.experts, i)  # [E]
        kept = top_experts(scores, request.keep, request.n_group)
        layers.append(LayerPlan(layer=i, num_experts_in=ls.experts.num_experts,
                                groups=[Group([e], [1.0]) for e in kept],
                                notes={"scores": [round(float(v), 6) for v in scores]}))
    return request.plan(method, layers)


@dataclass(frozen=True)
class RandomConfig:
    seed: int = 0  # seed of the random expert choice (per layer: seed + layer index)

    def __post_init__(self):
        options.seed("random", "seed", self.seed)


@register("random", config=RandomConfig, paper="baseline", needs_calibration=False,
          summary="keep a seeded random subset of experts")
def random_plan(request: PlanRequest, cfg: RandomConfig) -> Plan:
    def score(st: ExpertStats, layer: int):
        return torch.rand(st.num_experts, generator=torch.Generator().manual_seed(cfg.seed + layer))

    return plan_from_scores(request, "random", score)


@register(
    "frequency", config=NoOptions,
    paper="baseline: frequency trimming, as compared in DEK (arXiv 2407.09590)",
    summary="keep the most often routed experts (count_i)",
)
def frequency_plan(request: PlanRequest, cfg) -> Plan:
    return plan_from_scores(request, "frequency", lambda st, i: st.count)


@register(
    "routing_score", config=NoOptions,
    paper="routing-score pruning, the MoNE paper's baseline (arXiv 2507.00390)",
    summary="keep the experts with the largest summed gate weight (gate_sum_i)",
)
def routing_score_plan(request: PlanRequest, cfg) -> Plan:
    return plan_from_scores(request, "routing_score", lambda st, i: st.gate_sum)


@register(
    "ean", config=NoOptions,
    paper="EAN, expert activation norm, a baseline in the REAP paper (arXiv 2510.13999)",
    summary="keep the experts with the largest summed output norm (ean_sum_i)",
)
def ean_plan(request: PlanRequest, cfg) -> Plan:
    return plan_from_scores(request, "ean", lambda st, i: st.ean_sum)


@register(
    "reap", config=NoOptions, paper="REAP, router-weighted expert activation pruning (arXiv 2510.13999)",
    summary="keep the experts with the largest mean gate-weighted output norm (reap_sum_i / n_i)",
)
def reap_plan(request: PlanRequest, cfg) -> Plan:
    # never-routed experts score 0 rather than NaN
    return plan_from_scores(request, "reap", lambda st, i: st.reap_sum / st.count.clamp(min=1))
