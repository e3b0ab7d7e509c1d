"""What a run needs from the process: signals, the device, the memory policy, and progress bars.

Everything here is about the machine a run is on, not about models: which device computes, how much
memory is free (cgroup limits included), whether a checkpoint is read layer by layer (the default) or
loaded whole (only where something needs the whole model, after an estimate of its peak is checked),
and the progress bars on stderr.

SIGTERM (what `kill`, batch schedulers and `timeout` send) is raised as `Terminated`, so the same
`except BaseException` clean-ups that handle Ctrl-C remove a half-written output. The handlers are
installed only for the duration of a command and restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from moeprune.errors import MoepruneError


class Terminated(BaseException):
    """The process got SIGTERM; a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (SIGINT already raises KeyboardInterrupt)."""
    def raise_terminated(signum, _frame):
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


DEVICE_KINDS = ("cpu", "cuda", "auto")


def check_device(device: str) -> str:
    """The torch device string to use for `--device`, or one line saying what to give instead."""
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise MoepruneError(f"--device {device!r} is not supported: give cpu, cuda, cuda:N or auto")
    import torch

    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MoepruneError(
                f"--device {device} asked for, but torch sees no CUDA device; use --device cpu"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise MoepruneError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---- memory -----------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes a new allocation can get: MemAvailable, or less under a cgroup memory limit (containers, batch
    jobs)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    found += _cgroup_headroom()
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _cgroup_headroom(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> list[int]:
    """limit − (usage − inactive file cache) of this process's memory cgroup(s), v1 or v2; [] when
    unlimited."""
    out = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: 0::/path
            dirs, limit_f, usage_f, cache_key = [root / rel.lstrip("/"), root], \
                "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            dirs, limit_f, usage_f, cache_key = [root / "memory" / rel.lstrip("/"), root / "memory"], \
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            continue
        for d in dirs:
            try:
                raw = (d / limit_f).read_text().strip()
                if raw == "max" or int(raw) >= 1 << 60:  # no limit
                    continue
                usage = int((d / usage_f).read_text())
                stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
                out.append(max(0, int(raw) - usage + int(stat.get(cache_key, 0))))
                break
            except (OSError, ValueError):
                continue
    return out


GIB = 1024**3


def weights_on_disk(model_path: str | Path) -> int:
    """Bytes of the weight files (safetensors or .bin) in a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(model_path).iterdir()
               if p.is_file() and p.name.endswith((".safetensors", ".bin")))


def choose_in_memory(model_path: str | Path, requested: bool | None) -> tuple[bool, str]:
    """Whether to load the whole model (True) or read it layer by layer (False), and why.

    Layer by layer is the default: it peaks at about one layer and gives bit-identical results. The
    whole model is loaded when asked (`--in-memory`) or when the checkpoint has no safetensors weights
    (layer-by-layer reading needs them); then its peak is estimated and checked first (`check_fits`).
    """
    safetensors = any(Path(model_path).glob("*.safetensors"))
    if requested is True:
        return True, "as asked"
    if not safetensors:
        if requested is False:
            raise MoepruneError(f"{model_path} has no safetensors weights, which layer-by-layer work reads; "
                                "convert the checkpoint or use --in-memory")
        return True, "no safetensors weights to read layer by layer"
    return False, "as asked" if requested is False else "the default"


def check_fits(model_path: str | Path, copies: float, what: str) -> None:
    """Refuse before loading when `copies` x the weights (plus a tenth for activations) exceed the free
    memory.

    The estimate is honest, not generous: a loaded model takes its weights' bytes, a copy as many again.
    """
    need = int(weights_on_disk(model_path) * (copies + 0.1))
    free = available_memory()
    if free is not None and need > free:
        raise MoepruneError(f"{what} needs the whole model in memory: about {need / GIB:.1f} GiB "
                            f"({copies:g} x the weights), but {free / GIB:.1f} GiB is free; free memory, or "
                            "leave out what needs the whole model")


def return_freed_memory_to_the_system() -> None:
    """Make glibc hand large freed blocks back to the OS at once (Linux only; a no-op elsewhere).

    glibc raises its mmap threshold after each large free (up to 32 MiB), so later MiB-sized buffers
    (activations, per-expert slices) come from heaps it keeps: a layer-by-layer pass then grew RSS by
    ~0.2 GiB over 24 layers. A fixed 1 MiB threshold keeps every freed layer's memory out of RSS.
    It is process-wide and cannot be undone, so only the command line (which owns its process) calls it.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ---- progress -------------------------------------------------------------------------------------
@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """A rich progress bar on stderr; yields a callback taking the number of items done."""
    if not enabled:
        yield None
        return
    with _progress() as bar, _vanish_on_failure(bar):
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


@contextlib.contextmanager
def _vanish_on_failure(bar):
    """A failed or interrupted run's last line is its error: the bar is not redrawn after it stops."""
    try:
        yield
    except BaseException:
        bar.live.transient = True
        raise


def _progress(*fields: str, enabled: bool = True):
    """moeprune's progress bar on stderr: description, bar, done/total, `fields` (rich templates), times.

    Progress goes to stderr, so that stdout holds only results (tables, JSON) a script may read.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
        console=Console(stderr=True), disable=not enabled,
    )


def progress_display(*fields: str, enabled: bool = True):
    """The rich `Progress` every moeprune bar uses, for callers that drive it themselves (the testbed)."""
    return _progress(*fields, enabled=enabled)


@contextlib.contextmanager
def layer_progress(description: str, enabled: bool = True):
    """A progress callback for the layer-by-layer loop (`walk`): a bar over the decoder layers."""
    state: dict = {}
    if not enabled:
        yield None
        return
    with _progress() as bar, _vanish_on_failure(bar):
        def update(what: str, done: int, total: int) -> None:
            if "task" not in state:
                state["task"] = bar.add_task(description, total=total)
            bar.update(state["task"], completed=done, description=f"{description} {what}")

        yield update


@contextlib.contextmanager
def quiet_transformers(*, errors_only: bool = False) -> Iterator[None]:
    """Within the block, transformers shows no progress bars (and, with `errors_only`, logs errors only).

    Both are process-wide switches of transformers; the previous state is put back on exit, so a
    library call does not silence the caller's own later loads.
    """
    from transformers.utils import logging as tf_logging

    bars_were_on = tf_logging.is_progress_bar_enabled()
    verbosity = tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    if errors_only:
        tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if errors_only:
            tf_logging.set_verbosity(verbosity)
        if bars_were_on:
            tf_logging.enable_progress_bar()
