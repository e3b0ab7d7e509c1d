"""UNCURL: task-specific expert merging by router-logit clustering and aligned merging (arXiv 2409.01483).

UNCURL (Sarkar et al., "Revisiting SMoE Language Models by Evaluating Inefficiencies with Task
Specific Expert Pruning", arXiv 2409.01483) is *task-specific*: calibrate on the target task's own
text (`--calib task.jsonl --calib-template "..."`). Per MoE layer:

1. **Feature.** Expert i's column of router logits over the probe tokens, z_i ∈ R^n
   (`Stats.layers[i].probe.router_logits[:, i]`: the logits as the router outputs them, before
   softmax/sigmoid, with the router bias where the family has one).
2. **Clustering** of the E experts into r clusters (option `clustering`; which one the paper uses is
   **open** in docs/methods.md, so both are offered):
   - `spectral` (default): affinity = cosine similarity of the z_i rescaled to [0, 1], (cos + 1) / 2;
     the experts are embedded by the r leading eigenvectors of the normalised affinity and k-means
     (scikit-learn, seeded) clusters the rows. Reading taken where the paper is silent: each
     eigenvector is scaled by its eigenvalue (`spectral_embedding`, a diffusion-map embedding).
     The unscaled embedding (scikit-learn's `SpectralClustering` default) breaks down when r is
     close to E: router logits are low rank, and the embedding was then set by eigenvectors the
     affinity gives no weight to, so experts with unrelated logits were merged (qwen-fine 32→28:
     mean cosine inside merged clusters 0.07–0.49 per layer, perplexity ×1.2). With r well
     below E and clear clusters the two agree;
   - `spectral-plain`: that unweighted reading, scikit-learn's `SpectralClustering(affinity="precomputed")`
     on the same affinity, seeded, for comparison with implementations that use it;
   - `kmeans`: `KMeans` on the standardised z_i, seeded. Reading of "standardised": the [E, n]
     matrix of experts × probe tokens is standardised per token (zero mean, unit variance across
     the experts, scikit-learn's `StandardScaler`), so no token dominates the distance by scale.
   Spectral clustering can return fewer than r distinct labels; the fix-up is deterministic: while
   there are too few clusters, the member of the largest cluster (ties: lowest label) with the
   lowest mean affinity to the rest of its cluster (ties: lowest id) becomes a cluster of its own.
3. **Alignment.** The reference of a cluster is its most-used member (`count`, ties: lowest id).
   Every other member's hidden units are permuted to match it by a Hungarian assignment over
   W_gate,ref·W_gateᵀ + W_up,ref·W_upᵀ + W_down,refᵀ·W_down (`moeprune.methods.alignment`). The permutations
   go into the plan (`Group.perms`) and surgery applies them (option `align=false` skips this).
4. **Merging.** α_i = count_i / Σ_{j∈G} count_j (uniform when no member was routed); gate, up, down
   and biases are Σ α_i W_i, and the router rows merge with the same α (`router_merge="average"`).

Group-limited routers (DeepSeek-V3, GLM-4 MoE with n_group > 1): clustering runs inside each routing
group, to r / n_group clusters each, so every output expert comes from one group (Plan.validate).
The output is a stock checkpoint with r experts per MoE layer. Layer notes record the clustering,
the reference of every group and how many labels the fix-up had to create.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options
from moeprune.methods.alignment import align_members
from moeprune.methods.groups import routing_groups
from moeprune.methods.merging import frequency_coefficients, layer_plan
from moeprune.methods.registry import PlanRequest, register
from moeprune.observe.stats import LayerStats
from moeprune.plan import Plan

CLUSTERINGS = ("spectral", "spectral-plain", "kmeans")


@dataclass(frozen=True)
class UncurlConfig:
    # spectral (cosine affinity in [0, 1], eigenvalue-weighted embedding), spectral-plain (scikit-learn's
    # SpectralClustering on the same affinity, unweighted embedding) or kmeans (standardised logits)
    clustering: str = "spectral"
    seed: int = 0  # seed of the clustering (spectral embedding and k-means initialisation)
    align: bool = True  # permutation-align members to the cluster's reference before merging

    def __post_init__(self):
        options.one_of("uncurl", "clustering", self.clustering, CLUSTERINGS)
        options.seed("uncurl", "seed", self.seed)
        options.flag("uncurl", "align", self.align)


# ---- helpers shared with M-SMoE ---------------------------------------------------------------

def logit_features(ls: LayerStats, method: str) -> torch.Tensor:
    """[E, n] float64: row i is expert i's router logits over the probe tokens (z_i)."""
    logits = ls.probe.router_logits  # [n, E]
    if logits.shape[0] < 2:
        raise MoepruneError(
            f"{method} clusters experts by their router logits on the probe, but layer {ls.layer} "
            f"has {logits.shape[0]} probe tokens; calibrate with --calib and --probe-size >= 2"
        )
    return logits.double().T.contiguous()


def cosine_matrix(z: torch.Tensor) -> torch.Tensor:
    """[m, m] cosine similarity of the rows of z [m, n]; 0 against an all-zero row, 1 on the diagonal."""
    norms = z.norm(dim=1)  # [m]
    unit = z / norms.clamp(min=1e-300)[:, None]
    cos = (unit @ unit.T).clamp(-1, 1)
    cos[norms == 0] = 0
    cos[:, norms == 0] = 0
    cos.fill_diagonal_(1)
    return cos


def most_used(members: list[int], counts: torch.Tensor) -> int:
    """The member with the highest count (ties: the lowest id)."""
    return min(members, key=lambda e: (-float(counts[e]), e))


def merge_plan(request: PlanRequest, method: str, clusters_of, align: bool) -> Plan:
    """A merging plan: `clusters_of(layer, ls, ids, k) -> (clusters, references, notes)` per routing group.

    Each cluster becomes one output expert: a frequency-weighted merge of its members aligned to its
    reference. Notes from several routing groups are kept as lists, one entry per routing group.
    """
    if request.weights is None:
        raise MoepruneError(f"{method} reads the expert weights: plan it with the model")
    layers = []
    for i, ls in sorted(request.stats.layers.items()):
        E = ls.experts.num_experts
        counts = ls.experts.count
        access = request.weights.layer(i)
        groups, refs, per_group = [], [], []
        for ids, k in routing_groups(E, request.keep, request.n_group):
            clusters, references, extra = clusters_of(i, ls, ids, k)
            per_group.append(extra)
            for members, ref in sorted(zip(clusters, references), key=lambda cr: min(cr[0])):
                groups.append(sorted(members))
                refs.append(ref)
        coeffs, _ = frequency_coefficients(groups, counts)
        perms = [
            align_members(access, g, ref) if align and len(g) > 1 else None for g, ref in zip(groups, refs)
        ]
        notes = per_group[0] if len(per_group) == 1 else {k: [d[k] for d in per_group] for k in per_group[0]}
        notes = {**notes, "references": refs, "aligned": align}
        layers.append(layer_plan(i, E, groups, coeffs, "average", notes, perms))
    return request.plan(method, layers)


# ---- UNCURL clustering ------------------------------------------------------------------------

def _relabel(labels) -> list[int]:
    """Labels renumbered 0.. in order of first appearance (by expert position)."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(v), len(seen)) for v in labels]


def fix_up_labels(labels: list[int], k: int, affinity: torch.Tensor) -> tuple[list[int], int]:
    """Make exactly k distinct labels by splitting off the worst-fitting member of the largest cluster.

    Returns the new labels (0..k-1, by first appearance) and how many clusters were created.
    """
    labels = _relabel(labels)
    created = 0
    while len(set(labels)) < k:
        sizes = {c: labels.count(c) for c in sorted(set(labels))}
        big = min(sizes, key=lambda c: (-sizes[c], c))
        members = [j for j, c in enumerate(labels) if c == big]
        fit = {j: float(sum(affinity[j, o] for o in members if o != j)) / (len(members) - 1) for j in members}
        worst = min(members, key=lambda j: (fit[j], j))
        labels[worst] = max(labels) + 1
        created += 1
    return _relabel(labels), created


def spectral_embedding(affinity: torch.Tensor, k: int) -> np.ndarray:
    """[m, k] spectral embedding of an affinity [m, m], each coordinate scaled by its eigenvalue.

    The k leading eigenvectors u_j of the normalised affinity D^-1/2 A D^-1/2 (eigenvalues mu_j,
    D the degrees), mapped back by D^-1/2 as in scikit-learn's `spectral_embedding`, and multiplied by
    mu_j: row i is (mu_j u_j(i) / sqrt(d_i))_j, a diffusion-map embedding at t = 1.

    Why the weights: with k close to m (32 experts into 28), the plain k-eigenvector embedding
    keeps directions in which the affinity is (numerically) zero. Router logits have a low
    effective rank, so the cosine Gram matrix has many eigenvalues near 0 and those directions are
    an arbitrary basis of a near-null space; k rows of an almost complete orthonormal basis are
    then told apart only by the m - k discarded vectors, the *least* informative ones, and k-means
    grouped experts whose logits are nearly linearly dependent rather than similar (cosine 0 or
    below inside a cluster). With the weights those directions contribute nothing. When the graph
    has k well-separated clusters the k leading eigenvalues are all close to 1, so the embedding
    is the standard one.
    """
    A = affinity.double().numpy()
    s = 1.0 / np.sqrt(A.sum(axis=1))  # degrees >= 1: the diagonal of the affinity is 1
    mu, U = np.linalg.eigh(A * s[:, None] * s[None, :])  # ascending eigenvalues
    top = np.argsort(-mu, kind="stable")[:k]
    return U[:, top] * s[:, None] * mu[top][None, :]


def cluster_logits(z: torch.Tensor, k: int, clustering: str, seed: int) -> tuple[list[int], int]:
    """Labels 0..k-1 of the m rows of z [m, n] and the number of clusters the fix-up created."""
    m = z.shape[0]
    affinity = (cosine_matrix(z) + 1) / 2  # [m, m] in [0, 1]
    if k >= m:
        return list(range(m)), 0
    if k == 1:
        return [0] * m, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected" and k-means convergence chatter
        if clustering == "spectral":
            from sklearn.cluster import KMeans

            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(
                spectral_embedding(affinity, k)
            )
        elif clustering == "spectral-plain":
            from sklearn.cluster import SpectralClustering

            labels = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                        assign_labels="kmeans").fit_predict(affinity.numpy())
        elif clustering == "kmeans":
            from sklearn.cluster import KMeans
            from sklearn.preprocessing import StandardScaler

            x = StandardScaler().fit_transform(z.numpy().astype(np.float64))
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        else:
            raise MoepruneError(f"clustering {clustering!r} is not one of {CLUSTERINGS}")
    return fix_up_labels(list(labels), k, affinity)


@register(
    "uncurl", config=UncurlConfig, kind="merge", needs_weights=True,
    paper="UNCURL, task-specific expert pruning by router-logit clustering (arXiv 2409.01483)",
    summary="cluster experts by router logits on task text, align hidden units, frequency-weighted merge",
)
def uncurl_plan(request: PlanRequest, cfg: UncurlConfig) -> Plan:
    def clusters_of(layer: int, ls: LayerStats, ids: list[int], k: int):
        z = logit_features(ls, "uncurl")[ids]  # [m, n]
        labels, created = cluster_logits(z, k, cfg.clustering, cfg.seed + layer)
        clusters = [[ids[j] for j, c in enumerate(labels) if c == lab] for lab in range(k)]
        refs = [most_used(c, ls.experts.count) for c in clusters]
        return clusters, refs, {"clustering": cfg.clustering, "labels_fixed_up": created}

    return merge_plan(request, "uncurl", clusters_of, cfg.align)
