"""HC-SMoE: hierarchical clustering of experts by their mean outputs, then a frequency-weighted merge.

"Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (Chen et al., arXiv 2410.08589;
ICML 2025; reference code wazenmai/HC-SMoE). Per MoE layer, every expert is represented by its
raw output averaged over calibration tokens, the experts are clustered bottom-up with average
linkage, and each cluster is merged in weight space with coefficients proportional to how often
its members were routed. It shares DEK's machinery (`moeprune.methods.merging`, `methods.dek.plan_merging`).

Readings taken:
- The representation is the mean of E_i(x) over *all* probe tokens of the layer (every expert on
  the same tokens, not only on the tokens routed to it): one vector [H] per expert. The paper's
  calibration set is replaced by the probe reservoir (docs/methods.md, "HC-SMoE").
- `metric`: `euclidean` (default) is the distance the reference implementation uses between the
  mean outputs; `cosine` (1 - cosine similarity) is offered as the alternative.
- Linkage `average` is the paper's; `single` and `complete` are offered. The tree is cut at exactly
  r clusters; with group-limited routing each routing group is clustered on its own to r / n_group
  clusters (the paper has no group-limited models).
- `coefficients`: `frequency` (default, the paper's): alpha_i = count_i / sum_G count_j, the
  routing counts of the calibration pass (uniform inside a group that was never routed);
  `uniform` and `learned` (as DEK) are ablations.
- The router rows merge with the same coefficients (`router_merge=average`), biases alike.
- `align` (default `false`, the paper's "freq" merge averages the weights as they are). With `true`
  each merged cluster's members are permutation-aligned to its most-routed member (ties: the lowest
  id), which is its highest-coefficient member under `frequency`, before the weighted sum, as in
  UNCURL and M-SMoE (`moeprune.methods.alignment`; `Group.perms`, applied by surgery); `learned`
  coefficients are then fitted on the aligned merge. The option is moeprune's: the reference code
  offers other merges (ZipIt-style feature matching, "fix-dom"), which are not implemented here.
  Clustering is unaffected (mean outputs do not depend on hidden-unit order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.methods import options
from moeprune.methods.access import LayerWeights
from moeprune.methods.dek import check_calibration, plan_merging, probe_inputs
from moeprune.methods.merging import COEFFICIENTS, LINKAGES
from moeprune.methods.registry import PlanRequest, register
from moeprune.observe.stats import LayerStats
from moeprune.plan import ROUTER_MERGES, Plan

METRICS = ("euclidean", "cosine")


@dataclass(frozen=True)
class HcSmoeConfig:
    metric: str = "euclidean"  # distance between mean expert outputs: euclidean (reference code) | cosine
    linkage: str = "average"  # hierarchical clustering linkage: average (the paper's) | single | complete
    coefficients: str = "frequency"  # merge weights: frequency (count_i, the paper's) | uniform | learned
    router_merge: str = "average"  # merged router row: average (coefficient-weighted) | sum
    learn_steps: int = 50  # Adam steps for coefficients=learned
    learn_lr: float = 0.1  # Adam learning rate on the softmax logits for coefficients=learned
    align: bool = False  # permutation-align members to the cluster's most-routed member (the paper: false)

    def __post_init__(self):
        options.one_of("hc_smoe", "metric", self.metric, METRICS)
        options.one_of("hc_smoe", "linkage", self.linkage, LINKAGES)
        options.one_of("hc_smoe", "coefficients", self.coefficients, COEFFICIENTS)
        options.one_of("hc_smoe", "router_merge", self.router_merge, ROUTER_MERGES)
        options.integer("hc_smoe", "learn_steps", self.learn_steps, 0)
        options.number("hc_smoe", "learn_lr", self.learn_lr, strict=True)
        options.flag("hc_smoe", "align", self.align)


def mean_outputs(access: LayerWeights, ls: LayerStats) -> torch.Tensor:
    """[E, H] every expert's raw output averaged over all the layer's probe tokens."""
    x = probe_inputs(ls, "hc_smoe", "(mean expert outputs)")
    return access.expert_outputs(x).double().mean(dim=1)


def output_distance(means: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """[E, E] distance between mean outputs means [E, H]."""
    if metric == "euclidean":
        return torch.cdist(means, means)
    unit = means / means.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return (1.0 - unit @ unit.T).clamp(min=0.0)


@register("hc_smoe", config=HcSmoeConfig, kind="merge", needs_calibration=True, needs_weights=True,
          paper="HC-SMoE, hierarchical clustering of expert outputs (Chen et al., arXiv 2410.08589)",
          summary="merge clusters of experts with similar mean outputs (average linkage), frequency-weighted "
                  "(align=true: permutation-aligned)")
def hc_smoe_plan(request: PlanRequest, cfg: HcSmoeConfig) -> Plan:
    check_calibration(request, "hc_smoe", cfg.coefficients, "(mean expert outputs)")

    def distance(access: LayerWeights, ls: LayerStats) -> torch.Tensor:
        return output_distance(mean_outputs(access, ls), cfg.metric)

    def notes(D: torch.Tensor, groups: list[list[int]]) -> dict:
        return {"metric": cfg.metric}

    return plan_merging(request, "hc_smoe", cfg, distance, cfg.coefficients, notes)
