"""Weight-space merging helpers shared by the merging methods (DEK, HC-SMoE, and any other).

- Clustering to groups: `agglomerative_clusters` cuts an agglomerative tree over a distance
  matrix at exactly k clusters; `distance_clustering` makes it a `Clustering` for
  `methods.groups.within_routing_groups`, which runs it inside each routing group of a
  group-limited router (DeepSeek-V3, GLM-4 MoE).
- Coefficients: `uniform_coefficients`, `frequency_coefficients` (proportional to routing counts,
  uniform where a group was never routed), and `learn_coefficients`, which fits each group's
  coefficients on the simplex to reconstruct the MoE block's output on the probe tokens.
- `layer_plan` assembles a LayerPlan; `reconstruction_error` measures a LayerPlan on the probe.

Learned coefficients run the family's *own* MoE block on a copy whose expert and router tensors are
replaced by `M(alpha) @ W`, the very linear map surgery applies, built from tensors that carry
gradients; the copy is a capability of the weight access (`LayerWeights.merged_block`). Routing,
group limits, correction biases, renormalisation and shared experts are therefore exactly what the
merged model will compute; the top-k *selection* is piecewise constant in alpha (no gradient
through it), the gate values and expert weights are differentiable. The parameters are softmax logits per
group (Adam), started at the given coefficients (uniform by default); the best iterate is returned, so
the result never reconstructs worse than the start on the probe.

Shape letters: E experts in, R experts out, n probe tokens, H hidden.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

from moeprune.errors import MoepruneError
from moeprune.methods.groups import Clustering
from moeprune.plan import Group, LayerPlan

LINKAGES = ("average", "single", "complete")
COEFFICIENTS = ("uniform", "frequency", "learned")


# ---- clustering --------------------------------------------------------------------------------

def agglomerative_clusters(distance: torch.Tensor, k: int, linkage: str = "average") -> list[list[int]]:
    """Cut the agglomerative tree over `distance` [m, m] at exactly `k` clusters (local indices).

    The first m - k merges of scipy's linkage are replayed, so the count is exact even with tied
    heights (fcluster's `maxclust` may return fewer). Deterministic for a given matrix.
    """
    if linkage not in LINKAGES:
        raise MoepruneError(f"linkage {linkage!r} is not one of {', '.join(LINKAGES)}")
    m = distance.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"cannot cut {m} items into {k} clusters")
    if k == m:
        return [[i] for i in range(m)]
    D = distance.detach().double().clamp(min=0).numpy()
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    Z = scipy_linkage(squareform(D, checks=False), method=linkage)
    members: dict[int, list[int]] = {i: [i] for i in range(m)}
    for step in range(m - k):
        a, b = int(Z[step, 0]), int(Z[step, 1])
        members[m + step] = members.pop(a) + members.pop(b)
    return [sorted(v) for v in members.values()]


def distance_clustering(distance: torch.Tensor, linkage: str = "average") -> Clustering:
    """A `Clustering` cutting the agglomerative tree of the sub-matrix of `distance` [E, E]."""
    def cluster(ids: list[int], k: int) -> list[list[int]]:
        sub = distance[ids][:, ids]
        return [[ids[i] for i in c] for c in agglomerative_clusters(sub, k, linkage)]

    return cluster


# ---- coefficients ------------------------------------------------------------------------------

def uniform_coefficients(groups: list[list[int]]) -> list[list[float]]:
    return [[1.0 / len(g)] * len(g) for g in groups]


def frequency_coefficients(
    groups: list[list[int]], counts: torch.Tensor
) -> tuple[list[list[float]], list[int]]:
    """alpha_i = count_i / sum of the group's counts; uniform for a group never routed.

    Returns the coefficients and the indices of the groups that fell back to uniform.
    """
    coeffs, fallback = [], []
    for j, g in enumerate(groups):
        c = counts[g].double().clamp(min=0)
        if float(c.sum()) > 0:
            coeffs.append([float(v) for v in c / c.sum()])
        else:
            coeffs.append([1.0 / len(g)] * len(g))
            if len(g) > 1:
                fallback.append(j)
    return coeffs, fallback


def merge_matrix_of(groups: list[list[int]], coeffs, num_experts: int) -> torch.Tensor:
    """[R, E] merge matrix from groups and per-group coefficient tensors (differentiable)."""
    rows = []
    for g, c in zip(groups, coeffs):
        c = torch.as_tensor(c, dtype=torch.float32)
        rows.append(torch.zeros(num_experts, dtype=c.dtype).index_put((torch.tensor(g),), c))
    return torch.stack(rows)


def learn_coefficients(access, x: torch.Tensor, groups: list[list[int]], *, router_merge: str = "average",
                       init: list[list[float]] | None = None, steps: int = 50, lr: float = 0.1,
                       target: torch.Tensor | None = None,
                       perms: list[list[list[int]] | None] | None = None) -> tuple[list[list[float]], dict]:
    """Fit every multi-member group's coefficients on the simplex to reconstruct the MoE block.

    access: a `methods.access.LayerWeights`; x [n, H] the probe tokens; groups: member ids per
    output expert. Minimises ||B_alpha(x) - B(x)||^2 / ||B(x)||^2, B the original block and
    B_alpha the merged one, with alpha_G = softmax(theta_G) and Adam on theta. `perms` (per group,
    None or one hidden-unit permutation per member, as `Group.perms`) fits an aligned merge.
    Returns the best coefficients seen (the start included) and facts: relative error at the start
    and at the end, steps, seconds.
    """
    t0 = time.perf_counter()
    init = init or uniform_coefficients(groups)
    x = x.float()
    with torch.no_grad():
        target = access.block_output(x) if target is None else target.float()  # [n, H]
    scale = target.square().sum().clamp(min=1e-30)
    aligned = None
    if perms is not None and any(q is not None for q in perms):
        aligned = LayerPlan(layer=access.layer, num_experts_in=access.num_experts,
                            groups=[Group(list(g), list(c), q) for g, c, q in zip(groups, init, perms)])
    merged = access.merged_block(len(groups), router_merge, aligned)  # a copy, differentiable in M
    free = [j for j, g in enumerate(groups) if len(g) > 1]
    thetas = [
        torch.tensor(init[j], dtype=torch.float32).clamp(min=1e-6).log().requires_grad_(True) for j in free
    ]

    def coefficients() -> list[torch.Tensor]:
        out = [torch.tensor(c, dtype=torch.float32) for c in init]
        for j, th in zip(free, thetas):
            out[j] = torch.softmax(th, dim=0)
        return out

    def loss_now() -> torch.Tensor:
        merged.set(merge_matrix_of(groups, coefficients(), access.num_experts))
        return (merged(x) - target).square().sum() / scale

    best_loss, best = float("inf"), [list(map(float, c)) for c in init]
    first = None
    if thetas:
        opt = torch.optim.Adam(thetas, lr=lr)
        for step in range(steps + 1):
            opt.zero_grad()
            loss = loss_now()
            value = float(loss.detach())
            first = value if first is None else first
            if value < best_loss:  # kept in float64, renormalised so each group sums to 1
                best_loss, best = value, [(c.detach().double() / c.detach().double().sum()).tolist()
                                          for c in coefficients()]
            if step == steps:
                break
            loss.backward()
            opt.step()
    else:
        with torch.no_grad():
            best_loss = first = float(loss_now())
    info = {"relative_error_start": first, "relative_error": best_loss, "steps": steps if thetas else 0,
            "seconds": round(time.perf_counter() - t0, 4)}
    return best, info


def reconstruction_error(access, x: torch.Tensor, lp: LayerPlan, target: torch.Tensor | None = None) -> float:
    """||B_plan(x) - B(x)||^2 / ||B(x)||^2 on tokens x [n, H], B the MoE block (exact surgery path)."""
    with torch.no_grad():
        target = access.block_output(x) if target is None else target
        got = access.block_output(x, lp)
    return float((got - target).square().sum() / target.square().sum().clamp(min=1e-30))


def layer_plan(layer: int, num_experts: int, groups: list[list[int]], coeffs: list[list[float]],
               router_merge: str = "average", notes: dict | None = None,
               perms: list[list[list[int]] | None] | None = None) -> LayerPlan:
    """A LayerPlan merging `groups` with `coeffs` (singletons get coefficient exactly 1).

    `perms`, per group None or one hidden-unit permutation per member (`Group.perms`), aligns merges.
    """
    out = []
    for j, (g, c) in enumerate(zip(groups, coeffs)):
        q = perms[j] if perms is not None and len(g) > 1 else None
        out.append(Group(list(g), [1.0] if len(g) == 1 else [float(v) for v in c], q))
    return LayerPlan(layer=layer, num_experts_in=num_experts, groups=out, router_merge=router_merge,
                     notes=dict(notes or {}))
