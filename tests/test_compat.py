"""The transformers compatibility layer: the tested version matches the pin, and the warning outside it."""

from __future__ import annotations

import re
from pathlib import Path

from moeprune import compat
from moeprune.runtime import quiet_transformers


def test_tested_version_is_the_pyproject_pin():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    low = re.search(r'"transformers>=(\d+)\.(\d+),<\d+\.\d+"', text).groups()
    assert tuple(map(int, low)) == compat.TESTED_TRANSFORMERS


def test_version_warning_only_outside_the_tested_minor():
    assert compat.version_warning("5.23.0") is None
    assert compat.version_warning("5.23.7") is None
    assert compat.version_warning("5.23.1.dev0") is None
    for other in ("5.24.0", "5.22.3", "6.0.0", "garbage"):
        msg = compat.version_warning(other)
        assert msg is not None and "\n" not in msg
        assert f"transformers {other} is installed" in msg and "tested with transformers 5.23.x" in msg


def test_quiet_transformers_restores_the_previous_state():
    from transformers.utils import logging as tf_logging

    verbosity, initial = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    for bars_on in (True, False):
        tf_logging.enable_progress_bar() if bars_on else tf_logging.disable_progress_bar()
        with quiet_transformers(errors_only=True):
            assert not tf_logging.is_progress_bar_enabled()
            assert tf_logging.get_verbosity() == tf_logging.ERROR
        assert tf_logging.is_progress_bar_enabled() == bars_on and tf_logging.get_verbosity() == verbosity
    tf_logging.enable_progress_bar() if initial else tf_logging.disable_progress_bar()
