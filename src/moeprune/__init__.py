"""moeprune: make Mixture-of-Experts language models smaller without retraining.

Observe the experts on calibration text, plan which to remove or merge with a published method,
apply the plan, and write a checkpoint that stock transformers loads.

The public names below are imported on first use, so that `import moeprune` (and the CLI's
`--help` and `--version`) do not pay for importing torch and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "apply_checkpoint": "moeprune.api",
    "empty_stats": "moeprune.api",
    "inspect": "moeprune.api",
    "make_plan_for": "moeprune.api",
    "observe_checkpoint": "moeprune.api",
    "prune": "moeprune.api",
    "SUPPORTED_MODEL_TYPES": "moeprune.arch",
    "get_adapter": "moeprune.arch",
    "MoepruneError": "moeprune.errors",
    "METHODS": "moeprune.methods",
    "make_plan": "moeprune.methods",
    "export_stock": "moeprune.store.checkpoint",
    "from_pretrained": "moeprune.store.checkpoint",
    "Stats": "moeprune.observe",
    "observe": "moeprune.observe",
    "Group": "moeprune.plan",
    "LayerPlan": "moeprune.plan",
    "Plan": "moeprune.plan",
    "budget": "moeprune.plan",
    "apply_plan": "moeprune.surgery",
    # what the command line needs before (or without) importing torch
    "Terminated": "moeprune.runtime",
    "quiet_transformers": "moeprune.runtime",
    "return_freed_memory_to_the_system": "moeprune.runtime",
    "signals_as_exceptions": "moeprune.runtime",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'moeprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
