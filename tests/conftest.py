"""Shared fixtures: tiny random checkpoints of every family and calibration text.

Everything is CPU and tiny (hidden 64, 3 layers, 8 experts top-2). Saved checkpoints are
session-scoped and must never be modified by a test: tests that need to damage a checkpoint copy it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from helpers import SEED, calibration_text

from moeprune.arch.tiny import save_tiny_checkpoint

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# tiny models: one thread is as fast as two and avoids oversubscription when other jobs run
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A plain-text calibration file: a few stdlib modules, well over 8 x 32 tokens."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calibration_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, **config_overrides) -> path of a saved tiny checkpoint (cached per session).

    Read-only: copy it (see `copy_checkpoint`) before changing anything in it.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[tuple, Path] = {}

    def get(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = family + "".join(f"-{k}{v}" for k, v in key[1])
            path = root / name
            save_tiny_checkpoint(family, path, seed=SEED, **overrides)
            cache[key] = path
        return cache[key]

    return get

