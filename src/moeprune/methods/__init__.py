"""Methods: pure functions of Stats (and, where needed, expert weights) that return a Plan.

Each method registers itself with `@register(name, config=..., paper=...)`. A method never touches
the model: it reads statistics and weight views and returns a Plan, so it can be unit-tested on
synthetic statistics. `moeprune methods` lists this registry.
"""

from __future__ import annotations

from moeprune.methods.registry import METHODS, MethodSpec, PlanRequest, get_method, make_plan, register
from moeprune.methods import scores  # noqa: F401  (registers the score-based pruning methods)
from moeprune.methods import mone  # noqa: F401  (registers MoNE, pruning with novices)
from moeprune.methods import dek  # noqa: F401  (registers DEK, CKA grouping and weight-space merging)
from moeprune.methods import hc_smoe  # noqa: F401  (registers HC-SMoE, clustering by mean expert outputs)
from moeprune.methods import uncurl  # noqa: F401  (registers UNCURL, task-specific aligned merging)
from moeprune.methods import msmoe  # noqa: F401  (registers M-SMoE, merging into dominant experts)
from moeprune.methods import naee  # noqa: F401  (registers NAEE, best-reconstructing expert subset)

__all__ = ["METHODS", "MethodSpec", "PlanRequest", "get_method", "make_plan", "register"]
