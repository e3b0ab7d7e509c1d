"""Calibration on several processes: `torchrun --nproc-per-node P -m moeprune observe ...`.

Each rank runs the pass over its own contiguous chunk of the calibration batches and the statistics
are reduced afterwards; every rank ends with the same result and rank 0 writes it.

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

No global state is kept here beyond torch.distributed's own process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeprune.observe.stats import ExpertStats, LayerStats, Probe


@dataclass(frozen=True)
class Ranks:
    """This process's place among the calibration processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: str = "cpu") -> Ranks:
        """Join the torchrun process group when WORLD_SIZE > 1 (once per process), else Ranks(0, 1).

        gloo on CPU; nccl when `device` is CUDA ("cuda", "cuda:N" or "auto") and torch sees a GPU.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and (device.startswith("cuda") or device == "auto")
            if cuda:
                # object collectives on nccl use the current device: one GPU per local rank
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """Under torchrun, "cuda" becomes this process's GPU, "cuda:LOCAL_RANK"; anything else is unchanged."""
        if self.world > 1 and device == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return device

    def batch_starts(self, starts: list[int]) -> list[int]:
        """This rank's contiguous chunk of `starts`; chunk sizes differ by at most 1, a rank may get none."""
        base, extra = divmod(len(starts), self.world)
        first = self.rank * base + min(self.rank, extra)
        return list(starts[first : first + base + (self.rank < extra)])

    def reduce_layer_stats(self, layers: dict[int, LayerStats]) -> dict[int, LayerStats]:
        """Collective: every rank gets the statistics of all ranks merged (see the module docstring).

        Works on any subset of layers, as long as every rank passes the same layer keys.
        """
        if self.world == 1:
            return layers
        parts = self._all_gather(layers)
        keys = [sorted(p) for p in parts]
        if any(k != keys[0] for k in keys):
            raise RuntimeError(f"ranks reduced different layers: {keys}")
        return merge_layer_stats(parts)

    def max_over_ranks(self, value: float) -> float:
        """Collective: the largest `value` over the ranks (e.g. the wall time of the pass)."""
        if self.world == 1:
            return value
        return max(self._all_gather(float(value)))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _all_gather(self, obj) -> list:
        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts


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
        positions = torch.cat([pr.positions for pr in probes])
        order = positions.argsort(stable=True)
        probe = Probe(positions[order], torch.cat([pr.inputs for pr in probes])[order],
                      torch.cat([pr.router_logits for pr in probes])[order])
        merged[i] = LayerStats(parts[0][i].layer, experts, probe)
    return merged
