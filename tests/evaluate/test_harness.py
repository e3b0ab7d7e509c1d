"""The lm-eval bridge: its noise is captured and replayed only on failure."""

from __future__ import annotations

import pytest


def test_lm_eval_noise_is_captured_and_replayed_on_failure(capfd):
    import subprocess
    import sys

    from moeprune.evaluate.harness import _stderr_captured

    with _stderr_captured():
        print("a progress bar", file=sys.stderr)
        subprocess.run(["sh", "-c", "echo 'fatal: not a git repository' >&2"], check=False)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert "progress bar" not in err and "fatal" not in err and "after" in err  # fd 2 is back
    with pytest.raises(RuntimeError), _stderr_captured():
        subprocess.run(["sh", "-c", "echo 'the real cause' >&2"], check=False)
        raise RuntimeError("boom")
    assert "the real cause" in capfd.readouterr().err
