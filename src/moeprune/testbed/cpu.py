"""How many torch threads to use when other processes share the cores.

On a 2-core machine with one core kept busy by another process, torch's default of one thread per
core made a training step of the demo testbed 5-10x slower than one thread (the threads wait for
each other at every parallel region while one of them is descheduled). `FreeCores` reads how much
CPU the *other* processes used over an interval (all CPU time in `/proc/stat` minus this process's
own) and proposes the cores left over, at least one. Where `/proc/stat` is missing it proposes all
cores.

This only decides speed: callers use it where the thread count does not change the numbers (see
the demo testbed's test that trains with 1 and 2 threads and compares the weights bit for bit).
"""

from __future__ import annotations

import math
import os
import time

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds summed over all cores since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    total = sum(fields)
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


class FreeCores:
    """Cores not used by other processes, measured over the interval since the last `mark`."""

    def __init__(self, cores: int | None = None):
        self.cores = cores or os.cpu_count() or 1
        self.mark()

    def mark(self) -> None:
        self._stat = _cpu_seconds()
        self._own = time.process_time()  # every thread of this process, user + system

    def threads(self, min_interval: float = 0.2) -> int:
        """A thread count for the next stretch of work: the cores others left free, rounded, >= 1."""
        if self._stat is None:
            return self.cores
        now = _cpu_seconds()
        if now is None:
            return self.cores
        if now[1] - self._stat[1] < min_interval * self.cores:  # too short to tell: wait a little
            time.sleep(min_interval)
            now = _cpu_seconds() or now
        busy = now[0] - self._stat[0]
        total = now[1] - self._stat[1]
        own = time.process_time() - self._own
        if total <= 0:
            return self.cores
        others = max(0.0, busy - own) / total * self.cores  # cores' worth kept busy by other processes
        self.mark()
        # Round a little towards fewer threads: a thread that shares its core stalls all the others.
        return max(1, min(self.cores, math.floor(self.cores - others + 0.25)))
