"""Out-of-core pruning: read, observe, prune and write a checkpoint one decoder layer at a time.

Peak memory is about one decoder layer, not the model: see `loop.py` for the loop and
`moeprune.store.sharded` for how a layer is read through transformers' own key conversion.
"""

from moeprune.store.sharded import ShardedCheckpoint, available_memory, free
from moeprune.pipeline.loop import walk
from moeprune.pipeline.run import (
    ShardedWeights,
    apply_layerwise,
    forward_layerwise,
    observe_layerwise,
    perplexity_layerwise,
    prune_layerwise,
)

__all__ = ["ShardedCheckpoint", "ShardedWeights", "apply_layerwise", "available_memory", "forward_layerwise", "free",
           "observe_layerwise", "perplexity_layerwise", "prune_layerwise", "walk"]
