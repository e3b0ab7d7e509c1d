"""Put evaluated checkpoints side by side (the evaluation itself is `moeprune.evaluation.evaluate_models`).

`comparison_rows` turns that dict into rows with deltas against the first checkpoint (absolute and
relative for perplexity and sizes, points for accuracies); `render_table` (rich) and
`render_markdown` lay the rows out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Side-by-side comparison


@dataclass
class Cell:
    value: str
    delta: str = ""  # change against the first checkpoint ("+1.23", "-2.0 pt"); empty in the first column
    relative: str = ""  # the same change in percent of the first checkpoint's value, when meaningful
    better: bool | None = None  # whether the change is an improvement; None when neutral or zero

    def text(self, sep: str = " ") -> str:
        """The value, then the change: "12.40 +0.52 (+4.4%)" with `sep` between them."""
        if not self.delta:
            return self.value
        return f"{self.value}{sep}{self.delta}" + (f" ({self.relative})" if self.relative else "")


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:,.0f}"


def _lower_is_better(metric: str) -> bool:
    return "perplexity" in metric or "bits_per" in metric or metric.endswith("loss")


def _is_fraction(metric: str) -> bool:
    return metric.startswith(("acc", "exact_match", "f1", "mcc", "brier")) and not _lower_is_better(metric)


def _relative_cells(values: list[float | None], fmt, lower_better: bool | None) -> list[Cell]:
    """Cells with absolute and relative deltas against the first value."""
    base = values[0]
    cells = []
    for k, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            cells.append(Cell("—"))
        elif k == 0 or base is None:
            cells.append(Cell(fmt(v)))
        elif v == base:
            cells.append(Cell(fmt(v), "same"))
        else:
            d = v - base
            better = None if lower_better is None else (d < 0) == lower_better
            cells.append(Cell(fmt(v), ("+" if d > 0 else "-") + fmt(abs(d)),
                              f"{100 * d / base:+.1f}%" if base else "", better))
    return cells


def _point_cells(values: list[float | None], stderrs: list[float | None]) -> list[Cell]:
    """Accuracy-like cells in percent with "±stderr"; deltas in percentage points."""
    base = values[0]
    cells = []
    for k, (v, s) in enumerate(zip(values, stderrs)):
        if v is None:
            cells.append(Cell("—"))
            continue
        text = f"{100 * v:.1f}" + (f" ±{100 * s:.1f}" if s else "")
        if k == 0 or base is None:
            cells.append(Cell(text))
            continue
        d = 100 * (v - base)
        cells.append(
            Cell(text, "same")
            if v == base
            else Cell(text, f"{d:+.1f} pt", "", None if abs(d) < 0.05 else d > 0)
        )
    return cells


def comparison_rows(report: dict) -> list[tuple[str, list[Cell]]]:
    """(label, one Cell per checkpoint) rows: sizes, perplexities, task metrics."""
    models = report["models"]
    rows: list[tuple[str, list[Cell]]] = []
    for key, label in (("total", "parameters"), ("routed_experts", "  in routed experts")):
        rows.append((label, _relative_cells([m["parameters"][key] for m in models], _human, None)))

    def short(text: str) -> str:
        name = Path(text).name
        return name if sum(Path(t).name == name for t in report["texts"]) == 1 else text

    for text in report["texts"]:
        ppl = [m["perplexity"].get(text, {}).get("ppl") for m in models]
        rows.append((f"ppl {short(text)}", _relative_cells(ppl, lambda x: f"{x:,.2f}", True)))
    tasks = sorted({t for m in models for t in m["tasks"]})
    for task in tasks:
        metrics = [
            k for k in models[0]["tasks"].get(task, {}) if not k.endswith("_stderr") and k != "samples"
        ]
        for metric in metrics:
            values = [m["tasks"].get(task, {}).get(metric) for m in models]
            label = f"{task} {metric}"
            if _is_fraction(metric):
                stderrs = [m["tasks"].get(task, {}).get(f"{metric}_stderr") for m in models]
                rows.append((label, _point_cells(values, stderrs)))
            else:
                rows.append((label, _relative_cells(values, lambda x: f"{x:.4g}", _lower_is_better(metric))))
    return rows


def _headers(report: dict) -> list[str]:
    names = [m["name"] for m in report["models"]]
    return [n if names.count(n) == 1 else m["path"] for n, m in zip(names, report["models"])]


def render_table(report: dict, title: str | None = None):
    """A rich Table: one column per checkpoint, deltas against the first (green better, red worse)."""
    from rich.table import Table

    t = Table(title=title or "evaluation (deltas against the first checkpoint)")
    t.add_column("")
    for h in _headers(report):
        t.add_column(h, justify="right")
    for label, cells in comparison_rows(report):
        shown = []
        for c in cells:
            colour = {True: "green", False: "red", None: "dim"}[c.better]
            change = c.delta + (f" ({c.relative})" if c.relative else "")
            shown.append(c.value + (f"\n[{colour}]{change}[/]" if c.delta else ""))
        t.add_row(label, *shown)
    return t


def render_markdown(report: dict) -> str:
    """The same comparison as a markdown table, for benchmark write-ups."""
    heads = _headers(report)
    lines = ["| | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for label, cells in comparison_rows(report):
        shown = [c.text("<br>") for c in cells]
        lines.append(f"| {label.strip()} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"
