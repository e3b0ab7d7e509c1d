"""REAM: router-weighted expert activation merging (Jha et al., arXiv 2604.04356).

"REAM: Merging Improves Pruning of Experts in LLMs" (reference code SamsungSAILMontreal/ream). REAM
keeps REAP's choice of experts (arXiv 2510.13999) but, instead of dropping the rest, merges each of
them into one of the kept experts. Per MoE layer, with r the experts to keep:

1. **Saliency** s_i (option `saliency`):
   - `reap` (default, the paper's REAP saliency, g·||f||): the mean over the tokens routed to expert i
     of g_i(x)·||E_i(x)||, exactly moeprune's `reap` score (`reap_sum / count`, every calibration
     token, the gate weights the model itself uses);
   - `reap_squared` (the reference code, g²·||f||): the code multiplies the expert outputs by the gate
     before its REAP function multiplies by the gate again. Computed as the code does on the probe
     tokens: g = softmax of the router logits over all E, the experts routed to are the top-k logits,
     s_i = mean over the probe tokens routed to i of g_i(x)²·||E_i(x)||.
   Never-routed experts get the smallest positive saliency of the layer, so they still merge with a
   positive weight (the code does the same, capped at 0.5).
2. **Centroids:** the r most salient experts (ties: the lowest id).
3. **Similarity** of experts i, j on the probe tokens, the sum of two terms, each in [0, 1]:
   - gated expert outputs g_i(x)·E_i(x), g = softmax of the probe's router logits over all E, every
     expert run on every probe token (option `output_similarity`):
     `token` (default, the paper's): the cosine per token, averaged over the tokens;
     `mean` (the code's): the cosine of the token-averaged gated outputs.
     Both are rescaled to [0, 1] as (cos + 1) / 2, as in the code. With a positive gate the per-token
     cosine is that of the raw outputs; the gate only weighs tokens in the `mean` reading.
   - router logits: expert i's column of logits over the probe tokens (option `logit_similarity`):
     `cosine` (default, the paper's reading) as (cos + 1) / 2; `distance` (the code's): 1 - d / d_max,
     d the Euclidean distance between the unit-normalised columns and d_max the largest in the layer;
     `none` drops the term (the code's `--no_gate_output`).
   The paper sums the two terms and the code averages them; only their order is used, and a sum and
   a mean order pairs identically, so that is no option.
4. **Pseudo-pruning groups** (option `group_size`, the paper's C, default 16 as in paper and code): the
   centroids in descending saliency take, in turn, their most similar not yet assigned non-centroid
   experts (ties: the lowest id) until the group has C members; when every expert is assigned the
   remaining centroids stay alone. Every expert ends in exactly one group, so r·C must reach the
   layer's expert count (refused otherwise, as the code asserts). `group_size=0` is the code's
   M-SMoE-style variant: every non-centroid joins its most similar centroid.
5. **Alignment** (option `align`): each member's hidden units are matched to its centroid's by a
   Hungarian assignment minimising a cost [I, I] that sums (`both`, default, paper and code) the
   Euclidean distances between unit-normalised hidden activations act(gate x)·(up x) of the two
   units over the probe tokens (`activations`) and between unit-normalised weight rows
   [gate row | up row | down column (| gate/up biases)] (`weights`); `none` skips it. As in the code,
   the weight rows are reduced by PCA to `weight_pca` dimensions (default 64; 0 keeps them whole),
   the projection fit on the units of all the layer's experts and scaled by the singular values, then
   normalised again; randomised as the code's (two power iterations), from a local seeded generator.
   With very wide experts (Mixtral-8x7B, I = 14336) the assignment takes minutes per member, as for
   UNCURL; `align=none` skips it.
   The hidden activations are computed from the expert weights and the config's `hidden_act`, and
   checked against the family's own experts kernel on the probe (down·h + b must give its outputs);
   where they do not (experts that read a projected input or use another activation) the alignment
   uses the weights only and the layer notes say so.
6. **Merging:** α_i = s_i / Σ_{j∈G} s_j; gate, up, down and biases are Σ α_i W_i (members permuted), and
   the router rows merge with the same α (`router_merge=average`, or `sum`). Reading taken: the code
   keeps the centroid's router row instead, which a moeprune plan cannot express (a group's router
   rows merge with its coefficients); with C-sized groups dominated by the centroid the two differ
   little.
7. **Sequential layers:** the paper merges layer by layer and re-runs the calibration data through the
   merged layers before observing the next. That is moeprune's `--sequential`; REAM is layer-local,
   so it runs with it (and without it, every layer is observed on the original model).

Group-limited routers: centroids and groups are chosen inside each routing group (r / n_group
each). Layer notes record the centroids, the saliency, the group sizes and the alignment used.
Shape letters: E experts, n probe tokens, D expert output width, I expert width, F weight features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from moeprune.errors import MoepruneError
from moeprune.methods import options
from moeprune.methods.access import LayerWeights
from moeprune.methods.dek import probe_inputs
from moeprune.methods.groups import check_divisible, routing_groups
from moeprune.methods.merging import layer_plan
from moeprune.methods.registry import PlanRequest, register
from moeprune.methods.uncurl import cosine_matrix
from moeprune.observe.stats import LayerStats
from moeprune.plan import ROUTER_MERGES, Plan

SALIENCIES = ("reap", "reap_squared")
OUTPUT_SIMILARITIES = ("token", "mean")
LOGIT_SIMILARITIES = ("cosine", "distance", "none")
ALIGNS = ("both", "activations", "weights", "none")
# relative error of down·h + b against the family's kernel: bf16 rounding passes, a wrong activation does not
ACTIVATION_TOLERANCE = 5e-2


@dataclass(frozen=True)
class ReamConfig:
    group_size: int = 16  # C: most members of a group (0: every expert joins its nearest centroid)
    saliency: str = "reap"  # reap (g·||f||, the paper's) | reap_squared (g²·||f|| on the probe, the code's)
    output_similarity: str = "token"  # token (per-token cosine, paper) | mean (of mean outputs, code)
    logit_similarity: str = "cosine"  # cosine (the paper's) | distance (1 - d/d_max, the code's) | none
    align: str = "both"  # Hungarian cost: both (activations + weights) | activations | weights | none
    weight_pca: int = 64  # PCA width of the weight rows for the alignment (the code's 64; 0: no PCA)
    router_merge: str = "average"  # merged router row: average (saliency-weighted) | sum

    def __post_init__(self):
        options.integer("ream", "group_size", self.group_size, 0)
        options.one_of("ream", "saliency", self.saliency, SALIENCIES)
        options.one_of("ream", "output_similarity", self.output_similarity, OUTPUT_SIMILARITIES)
        options.one_of("ream", "logit_similarity", self.logit_similarity, LOGIT_SIMILARITIES)
        options.one_of("ream", "align", self.align, ALIGNS)
        options.integer("ream", "weight_pca", self.weight_pca, 0)
        options.one_of("ream", "router_merge", self.router_merge, ROUTER_MERGES)


# ---- saliency ------------------------------------------------------------------------------------

def saliency(ls: LayerStats, outputs: torch.Tensor, top_k: int, kind: str) -> torch.Tensor:
    """[E] float64 saliency, zeros raised to the smallest positive value (all zero: all ones).

    outputs [E, n, D]: every expert's raw output on the probe tokens (used by `reap_squared`).
    """
    if kind == "reap":
        s = ls.experts.reap_sum / ls.experts.count.clamp(min=1)
    else:
        logits = ls.probe.router_logits.double()  # [n, E]
        g = torch.softmax(logits, dim=-1)  # [n, E]
        routed = torch.zeros_like(g, dtype=torch.bool).scatter_(1, logits.topk(top_k, dim=-1).indices, True)
        norms = outputs.double().norm(dim=-1).T  # [n, E]
        s = (g.square() * norms * routed).sum(0) / routed.sum(0).clamp(min=1)
    s = s.double().clone()
    positive = s[s > 0]
    if positive.numel() == 0:
        return torch.ones_like(s)
    s[s <= 0] = positive.min()
    return s


# ---- similarity ----------------------------------------------------------------------------------

def output_similarity(outputs: torch.Tensor, gates: torch.Tensor, kind: str) -> torch.Tensor:
    """[E, E] in [0, 1] similarity of gated outputs; outputs [E, n, D], gates [n, E] (softmax)."""
    gated = outputs.double() * gates.double().T[:, :, None]  # [E, n, D]
    if kind == "mean":
        cos = cosine_matrix(gated.mean(dim=1))
    else:
        unit = gated / gated.norm(dim=-1, keepdim=True).clamp(min=1e-300)  # [E, n, D]; zero rows stay 0
        cos = torch.einsum("ind,jnd->ij", unit, unit) / max(gated.shape[1], 1)
        cos.fill_diagonal_(1)
    return (cos.clamp(-1, 1) + 1) / 2


def logit_similarity(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """[E, E] in [0, 1] similarity of the experts' router-logit columns; logits [n, E]."""
    z = logits.double().T  # [E, n]
    if kind == "cosine":
        return (cosine_matrix(z) + 1) / 2
    unit = z / z.norm(dim=1, keepdim=True).clamp(min=1e-300)
    d = torch.cdist(unit, unit)
    top = float(d.max())
    return torch.ones_like(d) if top <= 0 else 1 - d / top


def similarity(ls: LayerStats, outputs: torch.Tensor, cfg: ReamConfig) -> torch.Tensor:
    """[E, E] the combined similarity (the sum of the two terms; a mean would order pairs alike)."""
    logits = ls.probe.router_logits
    S = output_similarity(outputs, torch.softmax(logits.double(), dim=-1), cfg.output_similarity)
    if cfg.logit_similarity != "none":
        S = S + logit_similarity(logits, cfg.logit_similarity)
    return S


# ---- pseudo-pruning groups -------------------------------------------------------------------------

def check_group_size(m: int, k: int, C: int) -> None:
    """k centroids with groups of at most C members must hold all m experts (C = 0: no limit)."""
    if C and k * C < m:
        raise MoepruneError(f"ream group_size={C} lets {k} centroids hold at most {k * C} of {m} experts; "
                            f"pass group_size >= {-(-m // k)} (or group_size=0, or keep more experts)")


def pseudo_groups(ids: list[int], k: int, s: torch.Tensor, S: torch.Tensor, C: int) -> list[list[int]]:
    """Groups of expert ids: the k most salient of `ids` are centroids (first in each group, in saliency
    order), each taking its most similar unassigned non-centroids up to C members (C = 0: every
    non-centroid joins its most similar centroid). s [E] saliency, S [E, E] similarity."""
    order = sorted(ids, key=lambda e: (-float(s[e]), e))
    centroids = order[:k]
    groups = {c: [c] for c in centroids}
    free = [e for e in ids if e not in groups]
    if C == 0:
        for e in free:
            best = min(centroids, key=lambda c: (-float(S[c, e]), c))
            groups[best].append(e)
        return [groups[c] for c in centroids]
    check_group_size(len(ids), k, C)
    unassigned = set(free)
    for c in centroids:
        if not unassigned:
            break
        nearest = sorted(unassigned, key=lambda e: (-float(S[c, e]), e))[: C - 1]
        groups[c].extend(nearest)
        unassigned -= set(nearest)
    return [groups[c] for c in centroids]


# ---- alignment -----------------------------------------------------------------------------------

def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp(min=1e-12)


def weight_rows(access: LayerWeights, e: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[I, F] expert e's hidden units as unit rows: gate row | up row | down column (| gate/up bias)."""
    w = access.expert_weights(e)
    cols = [t.to(dtype) for t in (w.gate, w.up) if t is not None] + [w.down.to(dtype).T]
    cols += [b.to(dtype)[:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    return _unit_rows(torch.cat(cols, dim=1).detach().cpu())


def weight_features(access: LayerWeights, experts: list[int], width: int,
                    power_iterations: int = 2, seed: int = 0) -> dict[int, torch.Tensor]:
    """Per expert of `experts`, [I, r] float64 its unit weight rows projected on the r = `width` leading
    principal axes of all the layer's units, scaled by the singular values, normalised again; the
    unreduced rows when width is 0 or not below F.

    The PCA is randomised as the code's (`torch.pca_lowrank`: r random directions, two power
    iterations), from a local seeded generator, in float32 on the [E·I, F] matrix of all the layer's
    units (Qwen3-30B-A3B: 98304 × 6144, 2.4 GB, as the code holds it); an exact PCA would cost E·I·F².
    """
    F = weight_rows(access, experts[0]).shape[1]
    if width == 0 or width >= F:
        return {e: weight_rows(access, e) for e in experts}
    X = torch.cat([weight_rows(access, e, torch.float32) for e in range(access.num_experts)])  # [E·I, F]
    X -= X.mean(0)
    omega = torch.randn(F, width, generator=torch.Generator().manual_seed(seed))  # [F, r]
    Q = torch.linalg.qr(X @ omega).Q  # [E·I, r] a basis of the leading left singular space
    for _ in range(power_iterations):
        Q = torch.linalg.qr(X @ torch.linalg.qr(X.T @ Q).Q).Q
    _, sv, Vh = torch.linalg.svd(Q.T @ X, full_matrices=False)  # [r, F]
    P = Vh.T * sv[None, :]  # [F, r] principal axes scaled by the singular values, as the code
    I = X.shape[0] // access.num_experts
    return {e: _unit_rows((X[e * I:(e + 1) * I] @ P).double()) for e in experts}


def hidden_activations(access: LayerWeights, x: torch.Tensor, experts: list[int],
                       outputs: torch.Tensor) -> dict[int, torch.Tensor] | None:
    """Per expert, [I, n] float64 its hidden activations act(gate x)·(up x) on x [n, H], each unit's row
    normalised; None when down·h + b does not reproduce the kernel's outputs [E, n, D] (the experts read
    another input or compute another function)."""
    from moeprune import compat

    act = compat.activation(getattr(access.adapter.config, "hidden_act", None))
    if act is None:
        return None
    xd = x.double()
    out = {}
    for e in experts:
        w = access.expert_weights(e)
        up = xd @ w.up.double().T + (0 if w.up_bias is None else w.up_bias.double())  # [n, I]
        if w.gate is not None:
            gate = xd @ w.gate.double().T + (0 if w.gate_bias is None else w.gate_bias.double())
            h = act(gate) * up
        else:
            h = act(up)
        y = h @ w.down.double().T + (0 if w.down_bias is None else w.down_bias.double())  # [n, H]
        want = outputs[e].double()
        if y.shape != want.shape or float((y - want).norm()) > ACTIVATION_TOLERANCE * float(want.norm()):
            return None
        out[e] = _unit_rows(h.T.contiguous())
    return out


def match_units(cost: torch.Tensor) -> list[int]:
    """perm with new unit a = old unit perm[a], minimising the summed cost [I, I] (Hungarian)."""
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = [0] * len(rows)
    for a, b in zip(rows.tolist(), cols.tolist()):
        perm[a] = b
    return perm


def alignment_cost(centroid: int, member: int, acts: dict | None, weights: dict | None) -> torch.Tensor:
    """[I, I] cost of matching centroid unit a with member unit b: the summed feature distances."""
    cost = 0
    for feats in (acts, weights):
        if feats is not None:
            cost = cost + torch.cdist(feats[centroid], feats[member])
    return cost


# ---- the method ----------------------------------------------------------------------------------

def check_stats(request: PlanRequest, cfg: ReamConfig) -> None:
    """Refuse, before any layer's work, statistics that lack what REAM reads, or a budget C cannot hold."""
    if request.weights is None:
        raise MoepruneError("ream reads the expert weights: plan it with the model")
    m = request.model
    check_divisible(int(m["num_experts"]), request.keep, request.n_group)
    for ls in request.stats.layers.values():
        probe_inputs(ls, "ream", "(expert similarity)")
        if cfg.saliency == "reap" and float(ls.experts.count.sum()) <= 0:
            raise MoepruneError("ream saliency=reap needs routing statistics: pass --calib PATH")
        for ids, k in routing_groups(ls.experts.num_experts, request.keep, request.n_group):
            check_group_size(len(ids), k, cfg.group_size)


@torch.no_grad()
def plan_layer(request: PlanRequest, cfg: ReamConfig, ls: LayerStats):
    """The LayerPlan of one MoE layer (reads only this layer's statistics and weights)."""
    E = ls.experts.num_experts
    access = request.weights.layer(ls.layer)
    x = probe_inputs(ls, "ream", "(expert similarity)").float()  # [n, H]
    outputs = access.expert_outputs(x)  # [E, n, D]
    s = saliency(ls, outputs, int(request.model["top_k"]), cfg.saliency)
    S = similarity(ls, outputs, cfg)
    groups = []
    for ids, k in routing_groups(E, request.keep, request.n_group):
        groups.extend(pseudo_groups(ids, k, s, S, cfg.group_size))
    merged = [g for g in groups if len(g) > 1]
    used = sorted({e for g in merged for e in g})
    alignment = cfg.align
    want_acts, want_weights = cfg.align in ("both", "activations"), cfg.align in ("both", "weights")
    acts = hidden_activations(access, x, used, outputs) if used and want_acts else None
    if used and want_acts and acts is None:
        alignment, want_weights = "weights (hidden activations not reproducible for this family)", True
    weights = weight_features(access, used, cfg.weight_pca) if used and want_weights else None
    perms = []
    for g in groups:
        if len(g) == 1 or cfg.align == "none":
            perms.append(None)
            continue
        I = access.expert_weights(g[0]).up.shape[0]
        perms.append([list(range(I))] + [match_units(alignment_cost(g[0], e, acts, weights)) for e in g[1:]])
    coeffs = [[float(v) for v in s[g] / s[g].sum()] for g in groups]
    # output experts ordered by their smallest member, members ascending (perms and coefficients follow)
    order = sorted(range(len(groups)), key=lambda j: min(groups[j]))
    out_groups, out_coeffs, out_perms = [], [], []
    for j in order:
        pos = sorted(range(len(groups[j])), key=lambda p: groups[j][p])
        out_groups.append([groups[j][p] for p in pos])
        out_coeffs.append([coeffs[j][p] for p in pos])
        out_perms.append(None if perms[j] is None else [perms[j][p] for p in pos])
    notes = {"centroids": [groups[j][0] for j in order], "saliency": [round(float(v), 8) for v in s],
             "group_sizes": [len(g) for g in out_groups], "alignment": alignment}
    return layer_plan(ls.layer, E, out_groups, out_coeffs, cfg.router_merge, notes, out_perms)


@register(
    "ream", config=ReamConfig, kind="merge", needs_calibration=True, needs_weights=True,
    paper="REAM, router-weighted expert activation merging (Jha et al., arXiv 2604.04356)",
    summary="REAP-salient centroids absorb up to C similar experts each; aligned, saliency-weighted merge",
)
def ream_plan(request: PlanRequest, cfg: ReamConfig) -> Plan:
    check_stats(request, cfg)
    layers = [plan_layer(request, cfg, ls) for _, ls in sorted(request.stats.layers.items())]
    return request.plan("ream", layers)
