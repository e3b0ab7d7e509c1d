"""The pipeline: one walk over the decoder layers of a weight source (a checkpoint read layer by layer, or a
model in memory), observing, planning, applying and writing as it goes.

`sources.py` holds the two weight sources, `loop.py` the walk, `run.py` what is done with it
(observe, prune, apply, forward, perplexity) and `activations.py` how a layer's inputs are captured
and carried between layers. `moeprune.store.sharded` reads a layer through transformers' own key
conversion.
"""

from moeprune.pipeline.access import ShardedWeights
from moeprune.pipeline.loop import walk
from moeprune.pipeline.run import (
    apply,
    forward,
    forward_layerwise,
    observe,
    observe_layerwise,
    perplexity,
    perplexity_layerwise,
    prune,
)
from moeprune.pipeline.sources import CheckpointSource, ModelSource
from moeprune.store.sharded import ShardedCheckpoint

__all__ = [
    "CheckpointSource", "ModelSource", "ShardedCheckpoint", "ShardedWeights", "apply", "forward",
    "forward_layerwise", "observe", "observe_layerwise", "perplexity", "perplexity_layerwise", "prune",
    "walk",
]
