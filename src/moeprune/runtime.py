"""What a run needs from the process: signals as exceptions, and the device to compute on.

SIGTERM (what `kill`, batch schedulers and `timeout` send) is raised as `Terminated`, so the same
`except BaseException` clean-ups that handle Ctrl-C remove a half-written output. The handlers are
installed only for the duration of a command and restored afterwards.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

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
            raise MoepruneError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise MoepruneError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


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
