"""moeprune: make Mixture-of-Experts language models smaller without retraining.

Observe the experts on calibration text, plan which to remove or merge with a published method,
apply the plan, and write a checkpoint that stock transformers loads.
"""

__version__ = "0.1.0"

from moeprune.api import (
    apply_checkpoint,
    empty_stats,
    inspect,
    make_plan_for,
    observe_checkpoint,
    prune,
)
from moeprune.arch import SUPPORTED_MODEL_TYPES, get_adapter
from moeprune.errors import MoepruneError
from moeprune.methods import METHODS, make_plan
from moeprune.novice import export_stock, from_pretrained
from moeprune.observe import Stats, observe
from moeprune.plan import Group, LayerPlan, Plan, budget
from moeprune.surgery import apply_plan

__all__ = [
    "METHODS", "SUPPORTED_MODEL_TYPES", "Group", "LayerPlan", "MoepruneError", "Plan", "Stats", "apply_checkpoint",
    "apply_plan", "budget", "empty_stats", "export_stock", "from_pretrained", "get_adapter", "inspect", "make_plan",
    "make_plan_for", "observe",
    "observe_checkpoint", "prune",
]
