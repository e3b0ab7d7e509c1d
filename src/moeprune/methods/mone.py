"""MoNE: prune the least redundant-looking experts and replace each with a novice (arXiv 2507.00390).

MoNE (Mixture of Novices and Experts; Zhang et al., arXiv 2507.00390, reference code zxgx/mode-pd)
scores every expert by how often and how strongly it is used times how much its output varies:

    phi_i = phi_var,i * phi_freq,i
    phi_freq,i = gate_sum_i / N              (N: all calibration tokens)
    phi_var,i  = || sqrt(var_i) ||_2         (var_i: per-dimension variance of E_i(x) over T_i)

and prunes the experts with the lowest phi. Each pruned expert becomes a *novice*: the constant
vector `out_mean_i`. The router is unchanged, so a token routed to a novice receives
`g_i(x) * out_mean_i`.

Readings taken where the paper leaves room (docs/methods.md, "MoNE"):
- the frequency is gate-weighted and averaged over *all* N calibration tokens, as the reference code
  does (not over the routed tokens, not a raw count);
- the variance is the unbiased per-dimension variance of the raw (ungated) expert output over the
  tokens routed to the expert (`ExpertStats.var`, 0 below 2 tokens); phi_var is the L2 norm of its
  square root;
- the novice is the unweighted mean of the raw output over T_i; an expert never routed on the
  calibration data (n_i = 0) gets a zero novice, and the layer's `notes["never_routed"]` lists it;
- the router keeps its rows, its top-k and its gate normalisation: novices still take top-k slots;
- `novice=false` (the paper's ablation) keeps the router and uses zero vectors; `ranking=variance`
  and `ranking=frequency` are the single-factor ablations;
- the same number of experts is pruned in every layer; ties keep the lower expert id;
- Llama 4 applies its gate to the expert *input*; the observer records `E_i(g_i(x) x)` as the
  output, so there the novice is that mean and is added unscaled when routed (see
  `moeprune.arch.families.Llama4Text`).

Plans record the novice ids, not the vectors: `notes["novice_vectors"]` says `out_mean` or `zero`,
and the vectors are recomputed from the stats the plan came from (`novice_vectors` below),
which keeps plans small and editable (a vector per novice is 7168 floats on DeepSeek-V3, hundreds
of megabytes of JSON for a whole model). The written checkpoint stores the vectors themselves.

Group-limited routers (DeepSeek-V3/V3.2, GLM-4.5/5, Kimi-K2.5 with n_group > 1). The router keeps all
E rows, so its routing groups, the groups a token may use and the experts it picks are the original's:
novices need no `--flatten-groups`, and any count may be kept. The paper ranks the experts of a layer
together, and that stays the default (`within_groups=false`). `within_groups=true` keeps
`keep / n_group` experts in every routing group instead (the count must then fit the groups, as for
pruning): the novice model is the same kind of model, but its plain-pruned stock export
(`moeprune export-stock`) can then keep group-limited routing, which a per-layer ranking that leaves the
groups uneven cannot (that export is refused, or flattened on request).

Scope. `scope="layer"` (the default, the paper's) prunes the lowest phi in each layer.
`scope="global"` ranks every expert of every MoE layer together and prunes the globally lowest
`(E - r) * L`. Plans and checkpoints hold one expert count for all layers (`Plan.validate`, and the
plain-pruned part of a novice checkpoint is a stock config), and under one count per layer a global
ranking selects exactly what the per-layer ranking selects. So a global ranking is only different
when it would keep different counts in different layers, which cannot be applied today: moeprune
then refuses it and prints the per-layer counts the global ranking asked for (useful as a diagnostic
of where the redundancy is). Making it real needs per-layer expert counts in plans and checkpoints;
with novices the router keeps E rows everywhere, so only the experts tensors would differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options
from moeprune.methods.groups import top_experts
from moeprune.methods.registry import PlanRequest, register
from moeprune.observe.stats import ExpertStats
from moeprune.plan import Group, LayerPlan, Plan, check_same_calibration

RANKINGS = ("product", "variance", "frequency")
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class MoneConfig:
    novice: bool = (
        True  # replace pruned experts by their mean output; false: zero vectors (the paper's ablation)
    )
    ranking: str = "product"  # product = variance x frequency (MoNE); variance or frequency alone (ablations)
    scope: str = (
        "layer"  # layer: prune the lowest phi in each layer; global: rank all layers together (see docs)
    )
    # true: keep the same number of experts in every routing group of a group-limited router, so the
    # stock export keeps group-limited routing; false (the paper): rank the whole layer
    within_groups: bool = False

    def __post_init__(self):
        options.flag("mone", "novice", self.novice)
        options.one_of("mone", "ranking", self.ranking, RANKINGS)
        options.one_of("mone", "scope", self.scope, SCOPES)
        options.flag("mone", "within_groups", self.within_groups)
        if self.within_groups and self.scope == "global":
            raise MoepruneError("mone option within_groups=true ranks inside each layer's routing groups, "
                                "which scope=global does not; give scope=layer or within_groups=false")

    @property
    def layer_local(self) -> bool:
        """Whether a layer's plan depends on that layer alone (layer-by-layer pruning plans it in one
        pass)."""
        return self.scope == "layer"


def redundancy(st: ExpertStats, num_tokens: int, ranking: str = "product") -> torch.Tensor:
    """[E] float64 phi of every expert of one layer; the lowest are pruned."""
    freq = st.gate_sum / num_tokens  # [E] gate-weighted frequency over all tokens
    var = st.var.clamp(min=0).sum(dim=1).sqrt()  # [E] = || sqrt(var) ||_2
    return {"product": var * freq, "variance": var, "frequency": freq}[ranking]


def _global_keep(phi: dict[int, torch.Tensor], keep: int) -> dict[int, list[int]]:
    """Kept ids per layer when the lowest phi over all layers are pruned; refuses uneven counts."""
    layers = sorted(phi)
    E = phi[layers[0]].shape[0]
    # [L*E], layer-major, so ties prune earlier layers first
    flat = torch.cat([phi[i].double() for i in layers])
    order = torch.sort(flat, stable=True).indices[: (E - keep) * len(layers)]
    pruned: dict[int, set[int]] = {i: set() for i in layers}
    for j in order.tolist():
        pruned[layers[j // E]].add(j % E)
    kept = {i: [e for e in range(E) if e not in pruned[i]] for i in layers}
    counts = {i: len(k) for i, k in kept.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{i}: {c}" for i, c in counts.items())
        raise MoepruneError(
            f"scope=global would keep different expert counts per MoE layer ({detail}; {keep} on average), "
            "but "
            "plans and checkpoints hold one count for all layers, and with one count a global ranking is the "
            "per-layer one; use scope=layer (the default)"
        )
    return kept


@register("mone", config=MoneConfig, kind="novice",
          paper="MoNE, Mixture of Novices and Experts (Zhang et al., arXiv 2507.00390)",
          summary="prune the lowest output-variance x gate-frequency experts; each becomes a novice "
                  "(its mean output) behind the unchanged router")
def mone_plan(request: PlanRequest, cfg: MoneConfig) -> Plan:
    stats = request.stats
    N = stats.num_tokens
    if N <= 0:
        raise MoepruneError("mone needs statistics from a calibration pass (the stats record 0 tokens); "
                            "pass --calib or a stats directory from `moeprune observe`")
    phi = {i: redundancy(ls.experts, N, cfg.ranking) for i, ls in sorted(stats.layers.items())}
    if cfg.scope == "global":
        kept_by_layer = _global_keep(phi, request.keep)
    else:
        n_group = request.n_group if cfg.within_groups else 1
        if request.keep % n_group:
            raise MoepruneError(f"mone option within_groups=true keeps the same number of experts in each of "
                                f"the {n_group} routing groups, which {request.keep} is not a multiple of; "
                                f"keep a multiple of {n_group} or give within_groups=false")
        kept_by_layer = {i: top_experts(s, request.keep, n_group) for i, s in phi.items()}
    layers = []
    for i, ls in sorted(stats.layers.items()):
        E = ls.experts.num_experts
        kept = kept_by_layer[i]
        novices = [e for e in range(E) if e not in set(kept)]
        notes = {"scores": [float(f"{v:.6g}") for v in phi[i].tolist()],
                 "novice_vectors": "out_mean" if cfg.novice else "zero"}
        never = [e for e in novices if ls.experts.count[e] == 0]
        if never:
            notes["never_routed"] = never  # these novices are zero vectors: no output was ever seen
        layers.append(LayerPlan(layer=i, num_experts_in=E, groups=[Group([e], [1.0]) for e in kept],
                                novices=novices, notes=notes))
    return Plan(method="mone", layers=layers, model=dict(request.model), calibration=dict(stats.calibration))


def novice_vectors(plan: Plan, stats=None) -> dict[int, torch.Tensor]:
    """{layer: [n, H] float64} novice vectors of `plan`, in the order of each layer's `novices`.

    Vectors are a pure function of the statistics: `out_mean` of each novice (the unweighted mean
    of its raw output over the tokens routed to it), zero for an expert never routed, and zero for
    every novice when the plan was made with `novice=false` (`notes["novice_vectors"] == "zero"`).
    Plans record only the ids, so a plan with mean novices needs the stats it was made from.
    """
    layers = [lp for lp in plan.layers if lp.novices]
    if not layers:
        return {}
    H = int(plan.model.get("expert_dim") or plan.model.get("hidden_size")
            or (next(iter(stats.layers.values())).experts.mean.shape[1] if stats else 0))
    needs_stats = [lp.layer for lp in layers if lp.notes.get("novice_vectors", "out_mean") != "zero"]
    if needs_stats and stats is None:
        raise MoepruneError(
            "this plan replaces experts with novices (their mean output on the calibration data), "
            "which come from the statistics: pass the stats directory the plan was made from "
            "(--stats DIR)"
        )
    if stats is not None and needs_stats:
        check_same_calibration(plan, stats)
    out = {}
    for lp in layers:
        ids = torch.tensor(lp.novices, dtype=torch.long)
        if lp.layer not in needs_stats:
            out[lp.layer] = torch.zeros(len(lp.novices), H, dtype=torch.float64)
            continue
        if lp.layer not in stats.layers:
            raise MoepruneError(f"the statistics have no layer {lp.layer}, which the plan gives novices")
        st = stats.layers[lp.layer].experts
        if st.num_experts != lp.num_experts_in:
            raise MoepruneError(f"layer {lp.layer}: the statistics have {st.num_experts} experts, the plan "
                                f"{lp.num_experts_in}")
        routed = (st.count[ids] > 0)[:, None]  # [n, 1]; never-routed experts get a zero novice
        out[lp.layer] = torch.where(routed, st.mean[ids], torch.zeros_like(st.mean[ids]))
    return out
