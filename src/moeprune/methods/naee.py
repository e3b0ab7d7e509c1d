"""NAEE: keep the subset of experts that best reconstructs the MoE block output (arXiv 2402.14800).

NAEE (Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models", arXiv 2402.14800), expert pruning part. Per MoE layer,
with x the probe tokens entering the block:

    S* = argmin_{|S| = r} ‖Z − Ẑ_S‖_F,   Z = block(x),   Ẑ_S = block(x) after pruning to S

Ẑ_S is what surgery and the family's own router compute: the router restricted to the rows of S
and top-k re-selected among the survivors, with the family's renormalisation, sigmoid and
correction biases, group limits and shared experts (`LayerWeights.block_output`, on a copy).

Search (the plan's layer notes say which was used, `notes["search"]`):
- `exhaustive` when the number of candidate subsets is at most `max_exhaustive` (5000, as in
  docs/methods.md); ties keep the first subset in lexicographic order;
- `greedy` backward elimination otherwise: starting from all experts, drop one at a time the
  expert whose removal increases the error least (ties: the lowest id).

Group-limited routers (DeepSeek-V3, GLM-4 MoE with n_group > 1) keep r / n_group experts in every
routing group: the exhaustive search runs over products of per-group choices. The greedy search
drops one expert per routing group per round, so every evaluated subset stays divisible by
n_group; in a round, group g's candidates are scored with the other groups' drops of this round
(already chosen for earlier groups, the least-used expert as a placeholder for later ones).

Evaluation (`fast=true`, the default): every expert's output on the probe is computed once, and a
candidate is scored by running the block's own routing on a copy of the block that shares all
weights (only the sliced router tensors are new), with the experts replaced by a lookup into those
outputs; the routed sum is taken where the experts return it (shared experts cancel in Z − Ẑ).
So routing semantics are never re-implemented. Before a layer uses it, the fast path is checked
against `block_output` on seeded candidate subsets; if it disagrees by more than `tolerance`·‖Z‖
(or cannot run, as for Llama 4, whose experts take score-scaled inputs), that layer falls back to
`block_output`, which deep-copies the block per candidate. `notes["evaluation"]` says which ran.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options
from moeprune.methods.access import NotExact
from moeprune.methods.groups import routing_groups
from moeprune.methods.registry import PlanRequest, register
from moeprune.plan import Group, LayerPlan, Plan


@dataclass(frozen=True)
class NaeeConfig:
    max_exhaustive: int = 5000  # try every subset when there are at most this many, else greedy elimination
    fast: bool = True  # score subsets from precomputed expert outputs (checked against the block per layer)
    tolerance: float = (
        1e-4  # fast and block errors may differ by this times ‖Z‖ (at least 4 eps of the dtype)
    )
    seed: int = 0  # seed of the subsets used to check the fast path

    def __post_init__(self):
        options.integer("naee", "max_exhaustive", self.max_exhaustive, 0)  # 0: always greedy
        options.flag("naee", "fast", self.fast)
        options.number("naee", "tolerance", self.tolerance)
        options.seed("naee", "seed", self.seed)


def pruning_layer_plan(layer: int, num_experts: int, subset) -> LayerPlan:
    return LayerPlan(
        layer=layer, num_experts_in=num_experts, groups=[Group([int(e)], [1.0]) for e in sorted(subset)]
    )


class SubsetScorer:
    """‖Z − Ẑ_S‖_F on the probe tokens for candidate subsets S of one layer's experts.

    `access` is a `methods.access.LayerWeights`, `x` [n, H] the probe inputs.
    """

    def __init__(self, access, x: torch.Tensor, *, fast: bool = True, tolerance: float = 1e-4,
                 check_subsets: list[list[int]] = ()):
        self.access, self.x = access, x
        self.E = access.num_experts
        self.Z = access.block_output(x)  # [n, H]
        self.z_norm = float(self.Z.double().norm())
        self.evaluations = 0
        self.mode, self.reason = "block_output", "fast=false" if not fast else ""
        if fast:
            self._try_fast(tolerance, check_subsets)

    # ---- the reference evaluation: surgery on a deep copy of the block --------------------------
    def block_error(self, subset) -> float:
        lp = pruning_layer_plan(self.access.layer, self.E, subset)
        return float((self.Z - self.access.block_output(self.x, lp)).double().norm())

    # ---- the fast evaluation --------------------------------------------------------------------
    def _try_fast(self, tolerance: float, check_subsets) -> None:
        try:
            self._routed = self.access.routed_lookup(self.x)  # subset -> [n, H] routed sum
            self._R = self._routed(list(range(self.E)))  # [n, H] routed sum with every expert
            tol = max(tolerance, 4 * torch.finfo(self.access.dtype).eps) * max(self.z_norm, 1e-12)
            for subset in check_subsets:
                fast, slow = self.fast_error(subset), self.block_error(subset)
                if abs(fast - slow) > tol:
                    self.reason = f"fast path differs from block_output ({fast:.6g} vs {slow:.6g})"
                    return
        except NotExact as e:
            self.reason = str(e)
            return
        except Exception as e:  # noqa: BLE001  # any family the lookup cannot drive falls back, with the reason
            self.reason = f"fast path cannot run ({type(e).__name__}: {e})"
            return
        self.mode = "fast"

    def fast_error(self, subset) -> float:
        return float((self._R - self._routed(subset)).double().norm())

    def __call__(self, subset) -> float:
        self.evaluations += 1
        return self.fast_error(subset) if self.mode == "fast" else self.block_error(subset)


# ---- search -------------------------------------------------------------------------------------

def candidate_count(num_experts: int, keep: int, n_group: int) -> int:
    return math.prod(math.comb(len(ids), k) for ids, k in routing_groups(num_experts, keep, n_group))


def exhaustive_search(score, num_experts: int, keep: int, n_group: int) -> tuple[list[int], float]:
    """Every subset keeping keep / n_group per routing group; the first best in lexicographic order."""
    choices = [list(itertools.combinations(ids, k)) for ids, k in routing_groups(num_experts, keep, n_group)]
    best, best_err = None, math.inf
    for combo in itertools.product(*choices):
        subset = sorted(itertools.chain.from_iterable(combo))
        err = score(subset)
        if err < best_err:
            best, best_err = subset, err
    return best, best_err


def greedy_search(
    score, num_experts: int, keep: int, n_group: int, counts: torch.Tensor
) -> tuple[list[int], float]:
    """Backward elimination: each round drops, in every routing group, the expert whose removal hurts
    least."""
    groups = [list(ids) for ids, _ in routing_groups(num_experts, keep, n_group)]
    per_out = keep // n_group
    err = 0.0
    while len(groups[0]) > per_out:
        # placeholders for groups not decided yet this round: their least-used expert (ties: lowest id)
        drop = [min(g, key=lambda e: (float(counts[e]), e)) for g in groups]
        for gi, g in enumerate(groups):
            others = {d for h, d in enumerate(drop) if h != gi}
            best, best_err = None, math.inf
            for e in g:
                subset = [m for h in groups for m in h if m != e and m not in others]
                err_e = score(subset)
                if err_e < best_err:
                    best, best_err = e, err_e
            drop[gi], err = best, best_err
        groups = [[e for e in g if e != d] for g, d in zip(groups, drop)]
    return sorted(e for g in groups for e in g), err


def check_subsets(num_experts: int, keep: int, n_group: int, seed: int, count: int = 2) -> list[list[int]]:
    """`count` seeded random subsets respecting the routing groups, to check the fast path on."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        subset = []
        for ids, k in routing_groups(num_experts, keep, n_group):
            subset += [ids[j] for j in torch.randperm(len(ids), generator=g)[:k].tolist()]
        out.append(sorted(subset))
    return out


@register("naee", config=NaeeConfig, kind="prune", needs_weights=True,
          paper="NAEE, Not All Experts are Equal (arXiv 2402.14800), expert pruning",
          summary="keep the subset of experts that best reconstructs the MoE block output on the probe")
def naee_plan(request: PlanRequest, cfg: NaeeConfig) -> Plan:
    if request.weights is None:
        raise MoepruneError("naee reads the expert weights: plan it with the model")
    layers = []
    for i, ls in sorted(request.stats.layers.items()):
        E, r, G = ls.experts.num_experts, request.keep, request.n_group
        x = ls.probe.inputs  # [n, H]
        if x.shape[0] == 0:
            raise MoepruneError(f"naee scores subsets on the probe, but layer {i} has no probe tokens; "
                                "calibrate with --calib and --probe-size > 0")
        started = time.perf_counter()
        total = candidate_count(E, r, G)
        checks = check_subsets(E, r, G, cfg.seed + i) if r < E else []
        scorer = SubsetScorer(request.weights.layer(i), x, fast=cfg.fast, tolerance=cfg.tolerance,
                              check_subsets=checks)
        if r == E:
            search, kept, err = "none", list(range(E)), 0.0
        elif total <= cfg.max_exhaustive:
            search = "exhaustive"
            kept, err = exhaustive_search(scorer, E, r, G)
        else:
            search = "greedy"
            kept, err = greedy_search(scorer, E, r, G, ls.experts.count)
        notes = {"search": search, "candidate_subsets": total, "evaluations": scorer.evaluations,
                 "evaluation": scorer.mode, "error": round(err, 6),
                 "relative_error": round(err / scorer.z_norm, 6) if scorer.z_norm else 0.0,
                 "seconds": round(time.perf_counter() - started, 3)}
        if scorer.reason and scorer.mode != "fast":
            notes["fast_path_unused"] = scorer.reason
        layers.append(pruning_layer_plan(i, E, kept))
        layers[-1].notes = notes
    return request.plan("naee", layers)
