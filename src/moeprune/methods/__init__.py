"""Methods: pure functions of Stats (and, where needed, expert weights) that return a Plan.

Each method registers itself with `@register(name, config=..., paper=...)`. A method never touches
the model: it reads statistics and weight views and returns a Plan, so it can be unit-tested on
synthetic statistics. `moeprune methods` lists this registry.
"""

from __future__ import annotations

from moeprune.methods import (
    auto,  # noqa: F401  (registers auto, the per-layer choice among candidate methods)
    dek,  # noqa: F401  (registers DEK, CKA grouping and weight-space merging)
    hc_smoe,  # noqa: F401  (registers HC-SMoE, clustering by mean expert outputs)
    mone,  # noqa: F401  (registers MoNE, pruning with novices)
    msmoe,  # noqa: F401  (registers M-SMoE, merging into dominant experts)
    naee,  # noqa: F401  (registers NAEE, best-reconstructing expert subset)
    ream,  # noqa: F401  (registers REAM, REAP-salient centroids absorbing similar experts)
    scores,  # noqa: F401  (registers the score-based pruning methods)
    uncurl,  # noqa: F401  (registers UNCURL, task-specific aligned merging)
)
from moeprune.methods.registry import (
    METHODS,
    MethodSpec,
    PlanRequest,
    get_method,
    make_plan,
    make_plan_for,
    register,
)

__all__ = ["METHODS", "MethodSpec", "PlanRequest", "get_method", "make_plan", "make_plan_for", "register"]
