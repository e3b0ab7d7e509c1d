"""M-SMoE: merge every expert into its most similar dominant expert (arXiv 2310.01334).

M-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy", arXiv 2310.01334), the merging stage only (the paper's later low-rank compression is not
part of it here). Per MoE layer:

1. **Dominant experts:** the r experts with the highest `count` (ties: the lowest id).
2. **Grouping:** every other expert joins the dominant expert whose router-logit column over the
   probe (z_i ∈ R^n, as in UNCURL) is most similar by cosine (ties: the lowest dominant id). The
   paper's default similarity is router logits; an expert whose logit column is all zero has
   cosine 0 to every dominant and joins the lowest-id one.
3. **Alignment:** each non-dominant member's hidden units are permuted to match its dominant expert
   (Hungarian assignment, `moeprune.methods.alignment`, as in UNCURL step 3); the permutations go into the
   plan.
4. **Merging:** frequency weights α_i = count_i / Σ_{j∈G} count_j (uniform when no member was routed),
   for the experts and, with the same α, the router rows (`router_merge="average"`).

Group-limited routers: dominants are chosen and experts grouped inside each routing group
(r / n_group dominants each). Layer notes record the dominant experts (`references`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.methods import options
from moeprune.methods.groups import top_experts
from moeprune.methods.registry import PlanRequest, register
from moeprune.methods.uncurl import cosine_matrix, logit_features, merge_plan
from moeprune.observe.stats import LayerStats
from moeprune.plan import Plan


@dataclass(frozen=True)
class MsmoeConfig:
    align: bool = True  # permutation-align members to their dominant expert before merging

    def __post_init__(self):
        options.flag("msmoe", "align", self.align)


def assign_to_dominant(z: torch.Tensor, dominant: list[int]) -> list[int]:
    """For each row of z [m, n], the position in `dominant` (row ids) of the most cosine-similar dominant
    row."""
    cos = cosine_matrix(z)[:, dominant]  # [m, d]
    # argmax returns the first maximum, i.e. the lowest dominant id since `dominant` is ascending
    best = cos.argmax(dim=1).tolist()
    for pos, d in enumerate(dominant):
        best[d] = pos  # a dominant expert is its own group
    return best


@register(
    "msmoe", config=MsmoeConfig, kind="merge", needs_weights=True,
    paper="M-SMoE, Merge, Then Compress (arXiv 2310.01334), merging stage",
    summary="keep the r most used experts; merge each other expert into its most router-similar one, aligned",
)
def msmoe_plan(request: PlanRequest, cfg: MsmoeConfig) -> Plan:
    def clusters_of(layer: int, ls: LayerStats, ids: list[int], k: int):
        counts = ls.experts.count[ids]  # [m]
        dominant = top_experts(counts, k)  # positions within `ids`, ascending
        z = logit_features(ls, "msmoe")[ids]  # [m, n]
        best = assign_to_dominant(z, dominant)
        clusters = [[ids[j] for j in range(len(ids)) if best[j] == pos] for pos in range(len(dominant))]
        return clusters, [ids[d] for d in dominant], {}

    return merge_plan(request, "msmoe", clusters_of, cfg.align)
