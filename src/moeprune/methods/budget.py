"""Non-uniform layer budgets (`--budget global`): where to remove experts, by measured damage.

A uniform budget removes the same number of experts from every MoE layer. Layers are not equally
sensitive, so `--budget global` keeps the same *total* (the uniform count times the number of MoE
layers) and lets the counts differ:

1. Damage. For every MoE layer i and every candidate count r from the floor up to E (in steps of
   n_group under group-limited routing), the chosen method plans layer i alone with `keep=r`, and
   the damage d_i(r) is the relative squared error of the layer's MoE block output on its probe
   tokens, ‖Z − Ẑ_r‖² / ‖Z‖², with the family's own routing (`methods.naee.SubsetScorer`: the expert
   lookup where exact, the block's forward on a pruned copy otherwise; merges go through the
   block's forward). The probe inputs are the original model's, so each curve is measured with
   every other layer intact.
2. Allocation. The counts r_i minimise Σ_i d_i(r_i) subject to Σ_i r_i = total and
   floor <= r_i <= E, solved exactly by a min-plus dynamic programme over the layers (not the
   greedy marginal-damage rule: a damage curve need not be convex, and greedy can then end above the
   uniform allocation; the exact optimum never does, since the uniform counts are a feasible point).
   Ties go to the counts nearest the uniform one.

Reading taken: damage is measured per layer on the original inputs (no re-observation after the
earlier layers are pruned), and summed unweighted. This is moeprune's own proposal, not a
published method; it is a proxy for the model's loss, and `benchmarks/quality.py` is where it is
judged.

The method must plan layer by layer (its plan of a layer depends on that layer only), prune or
merge (novice checkpoints hold one kept count), and have calibration text with probe tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moeprune.errors import MoepruneError
from moeprune.methods.naee import SubsetScorer
from moeprune.methods.registry import PlanRequest, get_method
from moeprune.observe.stats import Stats
from moeprune.plan import BUDGETS, LayerPlan, Plan

TIE_PENALTY = 1e-12  # per step away from the uniform count: breaks exact ties only (damages are O(1))


@dataclass(frozen=True)
class BudgetChoice:
    """How the experts to remove are spread over the MoE layers (`--budget`, `--budget-floor`)."""

    mode: str = "uniform"  # uniform: the same count per layer; global: counts by measured damage
    floor: int | None = None  # fewest experts any layer keeps (global); None: max(top-k, E/4), see `floor`

    def __post_init__(self):
        if self.mode not in BUDGETS:
            raise MoepruneError(f"--budget {self.mode!r} is not one of {', '.join(BUDGETS)}")
        if self.floor is not None and self.mode != "global":
            raise MoepruneError("--budget-floor sets the fewest experts a layer keeps under --budget global; "
                                "add --budget global or drop --budget-floor")
        if self.floor is not None and (isinstance(self.floor, bool) or not isinstance(self.floor, int)
                                       or self.floor < 1):
            raise MoepruneError(f"--budget-floor {self.floor!r} must be a positive integer (experts per "
                                "layer)")

    @property
    def is_global(self) -> bool:
        return self.mode == "global"


def count_step(n_group: int) -> int:
    """Counts a layer may keep move in steps of n_group (each routing group keeps the same number)."""
    return max(int(n_group), 1)


def floor(choice: BudgetChoice, *, keep: int, num_experts: int, top_k: int, n_group: int = 1,
          min_per_group: int = 2) -> int:
    """The per-layer floor, checked: the given one, or max(top-k, ceil(E/4)) rounded up to the group step
    (and at least `min_per_group` per routing group), never above the uniform count `keep`."""
    step = count_step(n_group)
    least = max(top_k, step * min_per_group if step > 1 else 1)
    if choice.floor is None:
        f = max(least, math.ceil(num_experts / 4))
        return min(keep, step * math.ceil(f / step))
    f = choice.floor
    if f < least:
        raise MoepruneError(f"--budget-floor {f} is below {least}: every layer must keep at least "
                            f"top-k={top_k}"
                            + (f" and {min_per_group} experts in each of its {step} routing groups"
                               if step > 1 else ""))
    if f % step:
        raise MoepruneError(f"--budget-floor {f} is not a multiple of n_group={step}; every routing group "
                            "keeps the same number (or pass --flatten-groups)")
    if f > keep:
        raise MoepruneError(f"--budget-floor {f} is above the uniform count {keep}: the layers could not "
                            f"keep {keep} on average; lower --budget-floor or keep more experts")
    return f


def check_budget(choice: BudgetChoice, spec, cfg, *, has_calibration: bool, probe_size: int,
                 sequential: bool = False, grouped_flattened: bool = False) -> None:
    """Refuse, before any work, a global budget this prune cannot run (one line each).

    `grouped_flattened`: the model routes with groups (n_group > 1) and the output is to be flattened.
    """
    if not choice.is_global:
        return
    if grouped_flattened:
        raise MoepruneError("--budget global measures damage with the block's own group-limited routing, "
                            "which --flatten-groups removes (and uneven groups break it); drop "
                            "--flatten-groups (the counts then move in whole routing groups)")
    if spec.kind == "novice" or getattr(cfg, "format", None) == "novices":  # auto's novice format too
        raise MoepruneError(f"--budget global with {spec.name}: a novice checkpoint keeps one expert count "
                            "in every layer; use --budget uniform or a pruning method")
    if not spec.layer_local(cfg):
        raise MoepruneError(f"--budget global plans each layer at every count, but {spec.name} with these "
                            "options ranks all layers together; use a per-layer setting or --budget uniform")
    if sequential:
        raise MoepruneError("--sequential plans each layer as it goes, but --budget global plans all layers "
                            "together; drop one of them")
    if not has_calibration or probe_size < 1:
        raise MoepruneError("--budget global measures each layer's damage on probe tokens: pass --calib PATH "
                            "and --probe-size > 0")


# ---- damage ------------------------------------------------------------------------------------

def damage_curve(method: str, request: PlanRequest, layer: int, counts: list[int],
                 options: dict | None = None) -> list[tuple[LayerPlan, float]]:
    """(layer plan, relative squared block-output error on the probe) of `method` on one layer, per count."""
    spec = get_method(method)
    cfg = spec.default_config(**dict(options or {}))
    ls = request.stats.layers[layer]
    x = ls.probe.inputs  # [n, H]
    if x.shape[0] == 0:
        raise MoepruneError(f"--budget global measures damage on the probe, but layer {layer} has no probe "
                            "tokens; calibrate with --calib and --probe-size > 0")
    if request.weights is None:
        raise MoepruneError("--budget global reads the block outputs: plan it with the model")
    access = request.weights.layer(layer)
    scorer = SubsetScorer(access, x)
    one = Stats(model={**request.model, "moe_layers": [layer]}, calibration=request.stats.calibration,
                layers={layer: ls})
    z2 = scorer.z_norm ** 2
    out = []
    for r in counts:
        lp = spec.fn(PlanRequest(one, r, request.flatten_groups, request.weights), cfg).layers[0]
        if lp.novices:
            raise MoepruneError(f"--budget global with {method}: its layer {layer} has novices, and a novice "
                                "checkpoint keeps one expert count in every layer; use --budget uniform")
        if lp.is_pruning:
            err = scorer(lp.kept)
        else:  # a merge: the block's own forward on a copy with the plan applied
            err = float((scorer.Z - access.block_output(x, lp)).double().norm())
        out.append((lp, err * err / z2 if z2 > 0 else 0.0))
    return out


def allocate(damage: dict[int, list[float]], units: int, uniform: int) -> dict[int, int]:
    """{layer: u_i} minimising Σ damage[i][u_i] with Σ u_i = `units` (u: index into a layer's counts).

    Exact min-plus dynamic programme over the layers, O(L · U · L·U); ties towards u = `uniform`.
    """
    layers = sorted(damage)
    U = len(damage[layers[0]]) - 1
    if not 0 <= units <= U * len(layers):
        raise MoepruneError(f"cannot keep {units} steps over {len(layers)} layers of at most {U} each")
    pen = TIE_PENALTY * torch.abs(torch.arange(U + 1, dtype=torch.float64) - uniform)

    def cost(i):
        return torch.tensor(damage[i], dtype=torch.float64) + pen  # [U + 1]

    best = cost(layers[0])  # [t + 1]: least summed cost of the layers so far keeping t steps
    choices = []  # per later layer: [t + 1] the steps it keeps in the best way to reach t
    for i in layers[1:]:
        c = cost(i)
        T = best.shape[0] + U
        new = torch.full((T,), math.inf, dtype=torch.float64)
        arg = torch.zeros(T, dtype=torch.long)
        for u in range(U + 1):
            cand = torch.full((T,), math.inf, dtype=torch.float64)
            cand[u : u + best.shape[0]] = best + c[u]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(u), arg)
        best = new
        choices.append(arg)
    out, t = {}, units
    for i, arg in zip(reversed(layers[1:]), reversed(choices)):
        out[i] = int(arg[t])
        t -= out[i]
    out[layers[0]] = t
    return out


def global_budget_plan(method: str, request: PlanRequest, choice: BudgetChoice,
                       options: dict | None = None) -> Plan:
    """The plan of `method` whose per-layer counts sum to `request.keep` × layers, spread by damage."""
    spec = get_method(method)
    cfg = spec.default_config(**dict(options or {}))
    m = request.model
    E, K = int(m["num_experts"]), int(m["top_k"])
    n_group = request.n_group
    step = count_step(n_group)
    f = floor(choice, keep=request.keep, num_experts=E, top_k=K, n_group=n_group,
              min_per_group=int(m.get("min_experts_per_group", 2)))
    counts = list(range(f, E + 1, step))
    curves = {i: damage_curve(method, request, i, counts, options) for i in sorted(request.stats.layers)}
    uniform = (request.keep - f) // step
    units = uniform * len(curves)
    chosen = allocate({i: [d for _, d in c] for i, c in curves.items()}, units, uniform)
    layers = []
    for i, c in sorted(curves.items()):
        lp, _ = c[chosen[i]]
        lp.notes["budget"] = {"floor": f, "counts": counts, "damage": [float(d_) for _, d_ in c],
                              "kept": counts[chosen[i]], "uniform": request.keep}
        layers.append(lp)
    plan = request.plan(method, layers)
    plan.method_config = dataclasses.asdict(cfg)
    plan.flatten_groups = request.flatten_groups
    plan.budget = "global"
    plan.validate()
    return plan


def summed_damage(plan: Plan) -> tuple[float, float]:
    """(Σ damage at the plan's counts, Σ damage at the uniform count) from a global plan's notes."""
    ours = uniform = 0.0
    for lp in plan.layers:
        b = lp.notes["budget"]
        ours += b["damage"][b["counts"].index(b["kept"])]
        uniform += b["damage"][b["counts"].index(b["uniform"])]
    return ours, uniform
