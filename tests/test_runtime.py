"""Runtime facts: the cgroup memory limit counts as available memory."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_counts_as_available_memory(version, tmp_path):
    from moeprune.runtime import _cgroup_headroom

    proc = tmp_path / "cgroup"
    if version == "v1":
        proc.write_text("5:cpu:/\n4:memory:/job\n")
        d = tmp_path / "fs" / "memory" / "job"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(str(2 << 30))
        (d / "memory.usage_in_bytes").write_text(str(1 << 30))
        (d / "memory.stat").write_text("cache 5\ntotal_inactive_file 268435456\n")
    else:
        proc.write_text("0::/job\n")
        d = tmp_path / "fs" / "job"
        d.mkdir(parents=True)
        (d / "memory.max").write_text(str(2 << 30))
        (d / "memory.current").write_text(str(1 << 30))
        (d / "memory.stat").write_text("anon 1\ninactive_file 268435456\n")
    assert _cgroup_headroom(proc, tmp_path / "fs") == [(1 << 30) + (1 << 28)]
    (d / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).write_text(
        "9223372036854771712" if version == "v1" else "max")
    assert _cgroup_headroom(proc, tmp_path / "fs") == []
