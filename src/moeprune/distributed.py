"""Calibration on several processes: `torchrun --nproc-per-node P -m moeprune observe ...`.

Each rank runs the pass over its own contiguous chunk of the calibration batches and the statistics
are reduced afterwards (`moeprune.observe.reduce`); every rank ends with the same result and rank 0
writes it. This module knows the process group only, nothing of statistics.

No global state is kept here beyond torch.distributed's own process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        """Under torchrun, "cuda" becomes this process's GPU, "cuda:LOCAL_RANK"; anything else is
        unchanged."""
        if self.world > 1 and device == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return device

    def batch_starts(self, starts: list[int]) -> list[int]:
        """This rank's contiguous chunk of `starts`; chunk sizes differ by at most 1, a rank may get none."""
        base, extra = divmod(len(starts), self.world)
        first = self.rank * base + min(self.rank, extra)
        return list(starts[first : first + base + (self.rank < extra)])

    def max_over_ranks(self, value: float) -> float:
        """Collective: the largest `value` over the ranks (e.g. the wall time of the pass)."""
        if self.world == 1:
            return value
        return max(self.all_gather(float(value)))

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective: the sum of every rank's `tensor` (same shape on each), added in rank order so that
        every rank gets the same bits."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_gather(self, obj) -> list:
        """Collective: every rank's `obj` (picklable), in rank order; `[obj]` on one process."""
        if self.world == 1:
            return [obj]
        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

