"""Routing groups: the one place that says which experts a group-limited router groups together.

Group-limited routers (DeepSeek-V3, GLM-4 MoE with n_group > 1) pick experts from the best routing
groups, contiguous blocks of E / n_group experts. A plan keeps them valid (`Plan.validate`) only if
every output expert draws from one routing group and each group keeps `keep / n_group` experts, so
every method, pruning or merging, chooses inside each group with these helpers. With n_group = 1
there is one group of all experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeprune.errors import MoepruneError

Clustering = Callable[[list[int], int], list[list[int]]]  # (expert ids, k) -> k lists of member ids


def routing_groups(num_experts: int, keep: int, n_group: int) -> list[tuple[list[int], int]]:
    """(expert ids, experts to keep) per contiguous routing group; one group without group limits."""
    per_in, per_out = num_experts // n_group, keep // n_group
    return [(list(range(g * per_in, (g + 1) * per_in)), per_out) for g in range(n_group)]


def check_divisible(num_experts: int, keep: int, n_group: int) -> None:
    """Both counts must split evenly over the routing groups."""
    if n_group < 1 or num_experts % n_group or keep % n_group:
        raise MoepruneError(
            f"{num_experts} experts into {keep} groups cannot respect n_group={n_group}: both must "
            f"be multiples of {n_group} (or pass --flatten-groups)"
        )


def top_experts(scores: torch.Tensor, keep: int, n_group: int = 1) -> list[int]:
    """Ascending ids of the `keep` highest scores [E], `keep / n_group` per routing group.

    Ties break towards the lower expert id, so plans are deterministic.
    """
    per_in = scores.shape[0] // n_group
    kept = []
    for g, (_, k) in enumerate(routing_groups(scores.shape[0], keep, n_group)):
        s = scores[g * per_in : (g + 1) * per_in].double()
        # stable sort on -score keeps lower ids first among equals
        order = torch.sort(-s, stable=True).indices[:k]
        kept.extend((order + g * per_in).tolist())
    return sorted(kept)


def sort_groups(groups: list[list[int]]) -> list[list[int]]:
    """Members ascending inside each group; groups ordered by their smallest member."""
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def within_routing_groups(num_experts: int, keep: int, n_group: int, cluster: Clustering) -> list[list[int]]:
    """Cluster the experts into `keep` groups, `keep / n_group` inside each routing group.

    `cluster(ids, k)` clusters the expert ids `ids` into k lists of ids; with n_group = 1 it sees
    all experts at once. The result is sorted by `sort_groups`.
    """
    check_divisible(num_experts, keep, n_group)
    groups = []
    for ids, k in routing_groups(num_experts, keep, n_group):
        found = cluster(ids, k)
        if len(found) != k or sorted(m for c in found for m in c) != ids:
            raise AssertionError(f"clustering returned {found} for ids {ids} and k={k}")
        groups.extend(found)
    return sort_groups(groups)
