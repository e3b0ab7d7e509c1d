"""DEK: group experts by linear CKA and merge each group in weight space (arXiv 2407.09590).

"Diversifying the Expert Knowledge for Task-Agnostic Pruning in Sparse Mixture-of-Experts"
(Zhang et al., arXiv 2407.09590). Per MoE layer: represent every expert, measure linear CKA
between every pair (`moeprune.methods.cka`), cluster the experts agglomeratively on 1 - CKA down to `r`
groups, and merge each group's gate, up and down weights (and biases) as sum_i alpha_i W_i, its
router rows too. Every layer keeps the same `r`.

Readings taken where docs/methods.md ("DEK") marks a point open, each an option:

- `representation` (default `data`):
  - `data`: Y_i = E_i(X_probe), every expert's raw output on the *same* probe tokens of the layer
    ([n, H], n = probe size), computed at plan time. Needs a calibration pass (`--calib`).
  - `weight`: an expert's hidden units (rows of W_gate and W_up, concatenated: X_i [I, 2H], plus
    gate/up biases as two more columns where the family has them) are *samples*, column-centred
    over the units. Samples of two experts are not paired, so the similarity compares their
    distributions: the linear CKA formula applied to X_i^T, i.e. <C_i, C_j>_F / (|C_i| |C_j|) with
    C_i = X_i^T X_i the [2H, 2H] covariance of expert i's units. It depends only on the *set* of
    rows, so it is invariant to permuting (and sign-flipping) hidden units. No calibration.
  - `flat`: each expert's gate, up and down weights flattened into one vector; CKA of two
    single-feature representations is the squared Pearson correlation. Not permutation
    invariant (kept as the naive contrast). No calibration.
  - `surrogate`: E_i(Z) for a fixed Gaussian Z ~ N(0, 1) [surrogate_tokens, H] drawn from `seed`
    (the same Z for every layer). What the paper calls surrogate weights is open; this is the
    surrogate-input reading. No calibration.
- Similarity: linear CKA, column-centred, Gram form when n < d. The unbiased HSIC is not offered.
- Grouping (the paper's "expert graph" partition is open): agglomerative clustering on the
  distance 1 - CKA, `linkage` average (default), single or complete, cut at exactly r clusters.
  With group-limited routing (n_group > 1) each routing group is clustered on its own to
  r / n_group clusters, so merged experts never straddle routing groups.
- `coefficients`: `uniform` 1/|G| (the paper's), `frequency` alpha_i ∝ count_i (uniform inside a
  group never routed; needs --calib), or `learned`: fitted on the simplex to reconstruct the MoE
  block output on the probe (`moeprune.methods.merging.learn_coefficients`; needs --calib).
- `router_merge`: a group's router row is sum_i alpha_i w_i (`average`, default) or sum_i w_i
  (`sum`); router biases and `e_score_correction_bias` merge the same way (surgery). Top-k is
  unchanged.
- `align` (default `false`, the paper's: it averages the experts' weights as they are). With `true`
  every member of a merged group has its hidden units permuted to match the group's reference
  before the weighted sum, as UNCURL and M-SMoE do (`moeprune.methods.alignment`: a Hungarian
  assignment on gate/up/down weight similarity; the permutations go into `Group.perms` and surgery
  applies them). The reference is the group's most-routed member (ties, and plans without
  calibration: the lowest id), i.e. its highest-coefficient member under `frequency`; `learned`
  coefficients are fitted on the aligned merge. Experts trained from different initialisations
  order their hidden units arbitrarily, so their unaligned average is a different function; the
  option is moeprune's, and both readings are benchmarked. Grouping is unaffected (every
  representation but `flat` is invariant to hidden-unit order).

Plan notes per layer: the representation, the mean CKA inside merged groups, for `learned`
the probe reconstruction error of uniform and learned coefficients and the seconds spent, and with
`align=true` each group's reference (`references`) and `aligned: true`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options
from moeprune.methods.access import LayerWeights
from moeprune.methods.alignment import group_permutations
from moeprune.methods.cka import pairwise_cka, pairwise_vector_cka
from moeprune.methods.groups import within_routing_groups
from moeprune.methods.merging import (
    COEFFICIENTS,
    LINKAGES,
    distance_clustering,
    frequency_coefficients,
    layer_plan,
    learn_coefficients,
    uniform_coefficients,
)
from moeprune.methods.registry import PlanRequest, register
from moeprune.observe.stats import LayerStats
from moeprune.plan import ROUTER_MERGES, Plan

REPRESENTATIONS = ("data", "weight", "flat", "surrogate")


@dataclass(frozen=True)
class DekConfig:
    representation: str = (
        "data"  # data (outputs on the probe; needs --calib) | weight | flat | surrogate (no calib)
    )
    linkage: str = "average"  # agglomerative linkage on 1 - CKA: average | single | complete
    coefficients: str = (
        "uniform"  # merge weights in a group: uniform | frequency (count_i) | learned (fit on probe)
    )
    router_merge: str = "average"  # merged router row: average (coefficient-weighted) | sum
    surrogate_tokens: int = 512  # rows of the Gaussian input Z for representation=surrogate
    seed: int = 0  # seed of the surrogate input Z
    learn_steps: int = 50  # Adam steps for coefficients=learned
    learn_lr: float = 0.1  # Adam learning rate on the softmax logits for coefficients=learned
    align: bool = False  # permutation-align members to the group's most-routed member (the paper: false)

    def __post_init__(self):
        options.one_of("dek", "representation", self.representation, REPRESENTATIONS)
        options.one_of("dek", "linkage", self.linkage, LINKAGES)
        options.one_of("dek", "coefficients", self.coefficients, COEFFICIENTS)
        options.one_of("dek", "router_merge", self.router_merge, ROUTER_MERGES)
        options.integer("dek", "surrogate_tokens", self.surrogate_tokens, 2)  # CKA centres over >= 2 rows
        options.seed("dek", "seed", self.seed)
        options.integer("dek", "learn_steps", self.learn_steps, 0)
        options.number("dek", "learn_lr", self.learn_lr, strict=True)
        options.flag("dek", "align", self.align)

    def calibration_reason(self) -> str | None:
        """Why this configuration needs calibration text, or None (read by `api.prune`)."""
        if self.representation == "data":
            return (
                "representation=data compares expert outputs on probe tokens; "
                "-o representation=weight needs none"
            )
        if self.coefficients in ("frequency", "learned"):
            return f"coefficients={self.coefficients} reads routing counts or probe tokens"
        return None


# ---- representations ---------------------------------------------------------------------------

def probe_inputs(ls: LayerStats, method: str, what: str) -> torch.Tensor:
    """[n, H] the layer's probe tokens, or a clear error when the stats have none."""
    x = ls.probe.inputs
    if x.shape[0] == 0:
        raise MoepruneError(
            f"{method} {what} needs the probe tokens of a calibration pass, and layer {ls.layer} "
            "has none: pass --calib PATH (or plan from stats written by `moeprune observe`)"
        )
    return x


def surrogate_inputs(tokens: int, hidden: int, seed: int) -> torch.Tensor:
    """[tokens, H] a fixed standard Gaussian input, the same for every layer."""
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


def weight_samples(access: LayerWeights, e: int) -> torch.Tensor:
    """[I, 2H(+2)] expert e's hidden units as rows: gate row, up row (and their biases); [I, H(+1)] for
    non-gated experts (up -> act -> down), which have no gate."""
    w = access.expert_weights(e)
    cols = [t.float() for t in (w.gate, w.up) if t is not None]
    cols += [b.float()[:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    return torch.cat(cols, dim=1).detach()


def weight_similarity(access: LayerWeights) -> torch.Tensor:
    """[E, E] permutation-invariant CKA of the experts' hidden-unit distributions (see module doc)."""
    X = torch.stack([weight_samples(access, e) for e in range(access.num_experts)]).double()  # [E, I, 2H]
    Xc = X - X.mean(dim=1, keepdim=True)  # column-centred over the hidden units (the samples)
    return pairwise_cka(Xc.transpose(1, 2), centered=True)  # CKA of X_i^T: compares X_i^T X_i


def flat_similarity(access: LayerWeights) -> torch.Tensor:
    """[E, E] squared correlation of the flattened gate, up and down weights."""
    rows = []
    for e in range(access.num_experts):
        w = access.expert_weights(e)
        parts = [t.reshape(-1) for t in (w.gate, w.up, w.down) if t is not None]  # no gate when not gated
        rows.append(torch.cat(parts).detach().float())
    return pairwise_vector_cka(torch.stack(rows))


def expert_similarity(access: LayerWeights, ls: LayerStats | None, representation: str, *,
                      surrogate_tokens: int = 512, seed: int = 0, method: str = "dek") -> torch.Tensor:
    """[E, E] float64 linear CKA between the experts of one layer under `representation`."""
    options.one_of(method, "representation", representation, REPRESENTATIONS)
    if representation == "weight":
        return weight_similarity(access)
    if representation == "flat":
        return flat_similarity(access)
    if representation == "surrogate":
        # block inputs (H), which expert_outputs maps into the experts' space where that differs
        H = int(access.adapter.config.hidden_size)
        x = surrogate_inputs(surrogate_tokens, H, seed)
    else:
        if ls is None:
            raise MoepruneError(
                f"{method} representation=data needs calibration statistics with probe tokens"
            )
        x = probe_inputs(ls, method, "representation=data")
    return pairwise_cka(access.expert_outputs(x))  # [E, n, H] -> [E, E]


# ---- shared planning ---------------------------------------------------------------------------

def merge_coefficients(method: str, coefficients: str, access: LayerWeights, ls: LayerStats,
                       groups: list[list[int]], *, router_merge: str, learn_steps: int, learn_lr: float,
                       notes: dict, perms: list | None = None) -> list[list[float]]:
    """Coefficients for `groups` of one layer by the named rule; facts go into `notes`.

    `perms` (per group, as `Group.perms`) makes `learned` fit the aligned merge.
    """
    if coefficients == "uniform":
        return uniform_coefficients(groups)
    if coefficients == "frequency":
        if float(ls.experts.count.sum()) <= 0:
            raise MoepruneError(f"{method} coefficients=frequency needs routing counts: pass --calib PATH "
                                "(or use coefficients=uniform)")
        coeffs, fallback = frequency_coefficients(groups, ls.experts.count)
        if fallback:
            notes["frequency_fallback_uniform"] = [groups[j] for j in fallback]
        return coeffs
    x = probe_inputs(ls, method, "coefficients=learned")
    coeffs, info = learn_coefficients(access, x, groups, router_merge=router_merge, steps=learn_steps,
                                      lr=learn_lr, perms=perms)
    notes["learned"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()}
    return coeffs


def check_calibration(request: PlanRequest, method: str, coefficients: str, probe_for: str | None) -> None:
    """Fail before any layer's work when the stats lack what the options read.

    `probe_for` names what needs the probe tokens (None: nothing but the coefficients may).
    """
    for ls in request.stats.layers.values():
        if probe_for:
            probe_inputs(ls, method, probe_for)
        if coefficients == "learned":
            probe_inputs(ls, method, "coefficients=learned")
        if coefficients == "frequency" and float(ls.experts.count.sum()) <= 0:
            raise MoepruneError(f"{method} coefficients=frequency needs routing counts: pass --calib PATH "
                                "(or use coefficients=uniform)")


def plan_merging(
    request: PlanRequest, method: str, cfg, distance_fn, coefficients: str, notes_fn=None
) -> Plan:
    """A merging plan: per layer, cluster on `distance_fn(access, layer_stats)` [E, E], then merge.

    `cfg` carries `linkage`, `router_merge`, `learn_steps`, `learn_lr` and `align` (permutation-align
    each merged group to its reference, `methods.alignment.group_permutations`). `notes_fn(distance,
    groups)` may add per-layer notes.
    """
    if request.weights is None:
        raise MoepruneError(f"method {method} reads the expert weights: plan it with the model")
    layers = []
    for i, ls in sorted(request.stats.layers.items()):
        access = request.weights.layer(i)
        E = access.num_experts
        D = distance_fn(access, ls)  # [E, E]
        groups = within_routing_groups(E, request.keep, request.n_group, distance_clustering(D, cfg.linkage))
        notes = dict(notes_fn(D, groups) if notes_fn else {})
        perms = None
        if cfg.align:  # off: no perms and no notes, so the plan is the unaligned one bit for bit
            perms, refs = group_permutations(access, groups, ls.experts.count)
            notes.update(references=refs, aligned=True)
        coeffs = merge_coefficients(method, coefficients, access, ls, groups, router_merge=cfg.router_merge,
                                    learn_steps=cfg.learn_steps, learn_lr=cfg.learn_lr, notes=notes,
                                    perms=perms)
        layers.append(layer_plan(i, E, groups, coeffs, cfg.router_merge, notes, perms))
    return request.plan(method, layers)


def _mean_within(sim: torch.Tensor, groups: list[list[int]]) -> float | None:
    vals = [float(sim[a, b]) for g in groups for ai, a in enumerate(g) for b in g[ai + 1:]]
    return round(sum(vals) / len(vals), 6) if vals else None


@register("dek", config=DekConfig, kind="merge", needs_calibration=False, needs_weights=True,
          paper="DEK, Diversifying the Expert Knowledge (Zhang et al., arXiv 2407.09590)",
          summary="merge groups of experts with similar linear CKA (representation=data needs --calib; "
                  "weight, flat, surrogate need none); align=true permutation-aligns them first")
def dek_plan(request: PlanRequest, cfg: DekConfig) -> Plan:
    check_calibration(request, "dek", cfg.coefficients,
                      "representation=data" if cfg.representation == "data" else None)

    def distance(access: LayerWeights, ls: LayerStats) -> torch.Tensor:
        return 1.0 - expert_similarity(access, ls, cfg.representation, surrogate_tokens=cfg.surrogate_tokens,
                                       seed=cfg.seed)

    def notes(D: torch.Tensor, groups: list[list[int]]) -> dict:
        return {"representation": cfg.representation, "mean_cka_within_groups": _mean_within(1.0 - D, groups)}

    return plan_merging(request, "dek", cfg, distance, cfg.coefficients, notes)
