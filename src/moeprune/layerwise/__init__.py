"""Out-of-core pruning: read, observe, prune and write a checkpoint one decoder layer at a time.

Peak memory is about one decoder layer, not the model: see `pipeline.py` for the loop and
`checkpoint.py` for how a layer is read through transformers' own key conversion.
"""

from moeprune.layerwise.checkpoint import ShardedCheckpoint, available_memory, free
from moeprune.layerwise.pipeline import walk
from moeprune.layerwise.run import (
    ShardedWeights,
    apply_layerwise,
    forward_layerwise,
    observe_layerwise,
    perplexity_layerwise,
    prune_layerwise,
)

__all__ = ["ShardedCheckpoint", "ShardedWeights", "apply_layerwise", "available_memory", "forward_layerwise", "free",
           "observe_layerwise", "perplexity_layerwise", "prune_layerwise", "walk"]
