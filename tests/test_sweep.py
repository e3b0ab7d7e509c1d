"""`moeprune sweep`: the table, JSON and plot; the knee rule; bad budgets refused before calibrating."""

from __future__ import annotations

import json

import pytest

from moeprune import cli
from moeprune.errors import MoepruneError


@pytest.mark.slow
def test_sweep_cli_writes_the_table_json_and_plot(tmp_path, checkpoint, calib_file, capsys):
    src = checkpoint("mixtral")
    out = tmp_path / "sweep"
    argv = ["sweep", str(src), "--method", "uncurl,frequency", "--ratios", "0.25,0.5", "--calib",
            str(calib_file), "--text", str(calib_file), "--out", str(out), "--samples", "4", "--seq-len",
            "32", "--eval-seq-len", "32", "--max-tokens", "256", "--probe-size", "64",
            "-o", "uncurl:clustering=kmeans"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "quality against pruning ratio" in printed and "uncurl" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["experts"]) for r in result["rows"]] == [
        ("uncurl", 6), ("uncurl", 4), ("frequency", 6), ("frequency", 4)]
    assert result["options"] == {"uncurl": {"clustering": "kmeans"}}
    assert result["baseline"]["experts"] == 8 and result["baseline"]["ppl_rel"] == 1.0
    for row in result["rows"]:
        assert row["ppl_rel"] > 0 and str(calib_file) in row["perplexity"]
    assert set(result["knee"]) == {"uncurl", "frequency"}
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method |" in (out / "sweep.md").read_text()
    # one observation served every point: the stats' calibration is recorded once
    assert result["calibration"]["samples"] == 4


def test_sweep_knee_rule():
    from moeprune.sweep import knee

    def row(ratio, ppl_rel):
        return {"ratio": ratio, "experts": round(8 * (1 - ratio)), "ppl_rel": ppl_rel, "acc_rel": None}

    rows = [row(0.125, 1.02), row(0.25, 1.05), row(0.5, 1.10), row(0.625, 2.5), row(0.75, 4.0)]
    k = knee(rows, threshold=0.25)
    assert (k["ratio"], k["experts"]) == (0.625, 3)
    assert k["steepest_ratio"] == 0.625  # log 2.5 - log 1.1 is the largest step
    assert knee(rows[:3], threshold=0.25)["ratio"] is None
    acc = [{"ratio": 0.25, "experts": 6, "ppl_rel": None, "acc_rel": 0.95},
           {"ratio": 0.5, "experts": 4, "ppl_rel": None, "acc_rel": 0.6}]
    assert knee(acc, threshold=0.25)["ratio"] == 0.5


def test_sweep_refuses_bad_budgets_before_calibrating(tmp_path, checkpoint, calib_file, monkeypatch):
    import moeprune.api as api_module

    def boom(*a, **k):
        raise AssertionError("calibrated before checking the budget")

    monkeypatch.setattr(api_module, "observe_checkpoint", boom)
    from moeprune.sweep import sweep

    with pytest.raises(MoepruneError, match="top-k"):
        sweep(checkpoint("mixtral"), ["uncurl"], [0.25, 0.9], str(calib_file), tmp_path / "s",
              texts=[calib_file])
    with pytest.raises(MoepruneError, match="nothing to evaluate"):
        sweep(checkpoint("mixtral"), ["uncurl"], [0.25], str(calib_file), tmp_path / "s")


def test_sweep_plot_marks_the_knees_and_counts_experts_in_whole_numbers(tmp_path, monkeypatch):
    import matplotlib.figure

    from moeprune.sweep import plot

    def row(method, ratio, experts, ppl):
        return {"method": method, "ratio": ratio, "experts": experts, "perplexity": {"t.txt": {"ppl": ppl}},
                "acc_mean": None}

    points = {"a": [(0.25, 6, 11), (0.5, 4, 20)], "b": [(0.25, 6, 10), (0.5, 4, 12)]}
    rows = [row(m, r, e, p) for m, pts in points.items() for r, e, p in pts]
    result = {"texts": ["t.txt"], "tasks": [], "baseline": row("unpruned", 0, 8, 10), "num_experts": 8,
              "methods": ["a", "b"], "rows": rows, "model": "m",
              "knee": {"a": {"ratio": 0.5}, "b": {"ratio": None}}}
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k))[1])
    plot(result, tmp_path / "p.png")
    ax = figures[0].axes[0]
    knees = [line for line in ax.get_lines() if line.get_marker() == "X"]
    assert len(knees) == 1 and list(knees[0].get_xdata()) == [4]  # method a falls off at 4 experts
    assert all(line.get_marker() != "o" for line in ax.get_lines())  # no other point looks like a knee
    assert all(float(x).is_integer() for x in ax.get_xticks())
    assert "X: where quality falls off" in figures[0]._suptitle.get_text()
