"""`moeprune analyze`: expert-similarity heatmaps and their JSON."""

from __future__ import annotations

import json

import torch

from moeprune.cli import main
from moeprune.observe import Stats


def test_analyze_writes_heatmaps_and_json(checkpoint, calib_file, tmp_path, capsys):
    src = checkpoint("deepseek_v3")
    out = tmp_path / "weight"
    assert main(["analyze", str(src), "--out", str(out), "--experts", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["representation"] == "weight" and sorted(summary["layers"]) == ["1", "2"]
    for i in (1, 2):
        png = out / f"layer_{i:03d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rec = json.loads((out / f"layer_{i:03d}.json").read_text())
        S = torch.tensor(rec["cka"])
        assert S.shape == (8, 8) and torch.allclose(S, S.T) and torch.all(S.diagonal() == 1)
        assert len(rec["groups"]) == 4 and all({m // 4 for m in g} == {j // 2}
                                               for j, g in enumerate(rec["groups"]))

    stats_dir = tmp_path / "stats"
    assert main(["observe", str(src), "--calib", str(calib_file), "--out", str(stats_dir), "--samples", "4",
                 "--seq-len", "32", "--probe-size", "32"]) == 0
    data = tmp_path / "data"
    # model: the one the stats were observed on
    assert main(["analyze", str(stats_dir), "--out", str(data)]) == 0
    summary = json.loads((data / "summary.json").read_text())
    assert summary["representation"] == "data" and summary["experts_kept"] is None
    assert (data / "layer_001.png").is_file()
    assert Stats.load(stats_dir).layers[1].probe.inputs.shape[0] == 32
    capsys.readouterr()
    assert main(["analyze", str(src), "--out", str(tmp_path / "bad"), "--representation", "data"]) == 2
    assert "--stats" in capsys.readouterr().err
