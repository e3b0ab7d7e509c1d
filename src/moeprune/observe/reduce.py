"""The statistics of several calibration processes reduced into one (`torchrun`, see `moeprune.distributed`).

Why the reduction is exact:

* The batches are the same ones a single process would run (the same start offsets, split between
  ranks, never re-cut), so every batch's own float32 moments are computed from the same rows.
* Counts are float64 sums of integers, exact far beyond any calibration size.
* Means and M2 are combined with Chan's parallel formula (`ExpertStats.merge`), the same formula a
  single process uses to fold each batch into its running state; gate, REAP and EAN sums are float64
  sums. Merging the ranks' states in rank order differs from one process only in the association
  order of those float64 operations: ((b1 + b2) + b3) + (b4 + b5) instead of (((b1 + b2) + b3) + b4) + b5,
  i.e. by float64 rounding, ~1e-16 relative.
* Probe rows are selected by global token index, drawn from the seed before the pass, and every rank
  knows the global positions of its batches; the rows are gathered from the ranks and sorted by
  position, so the probe is identical bit for bit.

"""

from __future__ import annotations

import torch

from moeprune.distributed import Ranks
from moeprune.observe.stats import ExpertStats, LayerStats, Probe


def reduce_layer_stats(ranks: Ranks, layers: dict[int, LayerStats]) -> dict[int, LayerStats]:
    """Collective: every rank gets the statistics of all ranks merged (see the module docstring).

    Works on any subset of layers, as long as every rank passes the same layer keys.
    """
    if ranks.world == 1:
        return layers
    parts = ranks.all_gather(layers)
    keys = [sorted(p) for p in parts]
    if any(k != keys[0] for k in keys):
        raise RuntimeError(f"ranks reduced different layers: {keys}")
    return merge_layer_stats(parts)


def merge_layer_stats(parts: list[dict[int, LayerStats]]) -> dict[int, LayerStats]:
    """Merge the layer statistics of several disjoint shares of the calibration, in list order.

    Expert statistics fold in with Chan's formula (`ExpertStats.merge`); probe rows are concatenated
    and sorted by global token position. The inputs are not modified.
    """
    merged = {}
    for i in sorted(parts[0]):
        first = parts[0][i].experts
        experts = ExpertStats.from_tensors({k: v.clone() for k, v in first.tensors().items()})
        for p in parts[1:]:
            experts.merge(p[i].experts)
        probes = [p[i].probe for p in parts]
        positions = torch.cat([pr.positions for pr in probes])  # [P]
        order = positions.argsort(stable=True)
        probe = Probe(positions[order], torch.cat([pr.inputs for pr in probes])[order],
                      torch.cat([pr.router_logits for pr in probes])[order])
        merged[i] = LayerStats(parts[0][i].layer, experts, probe)
    return merged
