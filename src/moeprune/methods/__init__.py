"""Methods: pure functions of Stats (and, where needed, expert weights) that return a Plan.

Each method registers itself with `@register(name, config=..., paper=...)`. A method never touches
the model: it reads statistics and weight views and returns a Plan, so it can be unit-tested on
synthetic statistics. `moeprune methods` lists this registry.
"""

from __future__ import annotations

from moeprune.methods.registry import METHODS, MethodSpec, PlanRequest, get_method, make_plan, register
from moeprune.methods import scores  # noqa: F401  (registers the score-based pruning methods)
from moeprune.methods import mone  # noqa: F401  (registers MoNE, pruning with novices)

__all__ = ["METHODS", "MethodSpec", "PlanRequest", "get_method", "make_plan", "register"]
