"""Evaluate several checkpoints the same way and put them side by side.

`evaluate_models` loads each checkpoint in turn (one in memory at a time), measures its size,
its perplexity on each text file (`perplexity.perplexity`) and its lm-eval task scores
(`harness.run_tasks`), and returns one JSON-able dict. Everything that can be checked without a
model (paths, families, text files, task names and task data) is checked before the first load.

`comparison_rows` turns that dict into rows with deltas against the first checkpoint (absolute and
relative for perplexity and sizes, points for accuracies); `render_table` (rich) and
`render_markdown` lay the rows out.
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoepruneError

FORMAT = 1  # of the returned dict


def _task_setup(stack: ExitStack, tasks: Sequence[str], task_dir, task_texts, task_items, task_seed):
    """Build local tasks if asked (into `task_dir`, or a directory removed on exit), resolve all tasks."""
    from moeprune.evaluate.harness import load_tasks
    from moeprune.evaluate.tasks import write_tasks

    names, manifest = list(tasks), None
    if task_texts:
        if task_dir is None:
            task_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="moeprune-tasks-"))
        built = write_tasks(task_texts, task_dir, n_items=task_items, seed=task_seed)
        manifest = json.loads((Path(task_dir) / "manifest.json").read_text())
        names = names or built
    if not names:
        return None, None
    return load_tasks(names, task_dir), manifest


@contextmanager
def _window_bar(description: str, enabled: bool):
    """A rich progress bar on stderr; yields a `(done, total)` callback, or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def evaluate_models(
    paths: Sequence[str | Path], texts: Sequence[str | Path] = (), tasks: Sequence[str] = (), *,
    task_dir: str | Path | None = None, task_texts: Mapping[str, str | Path] | None = None,
    task_items: int = 300, task_seed: int = 0, seq_len: int = 512, max_tokens: int | None = None,
    batch_size: int = 8, limit: float | None = None, device: str = "cpu", tokenizer: str | None = None,
    progress: bool = False, layerwise: bool | None = None, notify=None,
) -> dict:
    """Perplexity on `texts` and scores on `tasks` for each checkpoint in `paths`, as one dict.

    `tasks` are lm-eval task, group or tag names; names defined by YAML files in `task_dir` are
    found there. `task_texts` ({domain: .txt}) builds the local multiple-choice and cloze tasks of
    `moeprune.evaluate.tasks` (`task_items` items each, seeded by `task_seed`) into `task_dir`, or
    into a temporary directory when none is given; with no `tasks`, all built tasks are run.
    `limit` keeps the first N items of each task. `tokenizer` replaces every model's own. Models
    run as loaded, with the experts kernel their config names. `layerwise` (default: for checkpoints
    larger than half the free memory) computes perplexity one decoder layer at a time, without ever
    loading the model; lm-eval tasks need the whole model. `notify(message)` hears the choice.

    Returns {"format", "settings", "texts", "tasks", "task_manifest", "models": [per checkpoint:
    {"path", "name", "model_type", "parameters", "perplexity": {text: {...}}, "tasks": {task:
    {metric: value}}, "seconds": {...}}]}.
    """
    from moeprune import __version__
    from moeprune.api import resolve_device
    from moeprune.arch import get_adapter
    from moeprune.evaluate.harness import run_tasks
    from moeprune.evaluate.perplexity import perplexity
    from moeprune.store.checkpoint import load_config, load_model, load_tokenizer, parameter_counts

    if not paths:
        raise MoepruneError("no model to evaluate")
    if not texts and not tasks and not task_texts:
        raise MoepruneError("nothing to evaluate: give text files (--text) and/or tasks (--tasks, --task-text)")
    if seq_len < 2 or batch_size < 1 or (max_tokens is not None and max_tokens < seq_len):
        raise MoepruneError(f"need --seq-len >= 2, --batch-size >= 1 and --max-tokens >= --seq-len "
                            f"(got {seq_len}, {batch_size}, {max_tokens})")
    for p in paths:
        config = load_config(p)
        get_adapter(config)
        max_pos = getattr(config, "max_position_embeddings", None)
        if texts and isinstance(max_pos, int) and seq_len > max_pos:
            raise MoepruneError(f"--seq-len {seq_len} exceeds the max_position_embeddings {max_pos} of {p}; "
                                f"use --seq-len {max_pos} or less")
    for t in texts:
        if not Path(t).exists():
            raise MoepruneError(f"text file {t} does not exist")
    modes = {p: _evaluation_mode(p, layerwise, bool(tasks or task_texts)) for p in paths}
    device = resolve_device(device)
    tokenizers = [load_tokenizer(tokenizer or p) for p in paths]

    with ExitStack() as stack:
        suite, manifest = _task_setup(stack, tasks, task_dir, task_texts, task_items, task_seed)
        report = {
            "format": FORMAT, "moeprune_version": __version__,
            "settings": {"seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size, "limit": limit,
                         "device": device, "task_items": task_items if task_texts else None,
                         "task_seed": task_seed if task_texts else None},
            "texts": [str(t) for t in texts], "tasks": suite.names if suite else [],
            "task_manifest": manifest, "models": [],
        }
        for path, tok in zip(paths, tokenizers):
            t0 = time.perf_counter()
            by_layer, why = modes[path]
            if notify is not None:
                notify(f"{path}: {'layer by layer' if by_layer else 'whole model in memory'} ({why})")
            if by_layer:
                entry = _layerwise_entry(path, texts, tok, seq_len, max_tokens, batch_size, device, progress)
                report["models"].append(entry)
                continue
            model = load_model(path, device=device)
            entry = {"path": str(path), "name": Path(path).resolve().name, "model_type": model.config.model_type,
                     "parameters": parameter_counts(model), "perplexity": {}, "tasks": {},
                     "seconds": {"load": time.perf_counter() - t0}}
            t0 = time.perf_counter()
            for text in texts:
                with _window_bar(f"{entry['name']}: perplexity on {Path(text).name}", progress) as cb:
                    entry["perplexity"][str(text)] = perplexity(model, tok, Path(text), seq_len=seq_len,
                                                                max_tokens=max_tokens, batch_size=batch_size,
                                                                progress=cb)
            entry["seconds"]["perplexity"] = time.perf_counter() - t0
            if suite is not None:
                t0 = time.perf_counter()
                entry["tasks"] = run_tasks(model, tok, suite, limit=limit, batch_size=batch_size)
                entry["seconds"]["tasks"] = time.perf_counter() - t0
            report["models"].append(entry)
            del model
            gc.collect()
    return report


def _evaluation_mode(path, layerwise: bool | None, with_tasks: bool) -> tuple[bool, str]:
    """(layer by layer?, why) for one checkpoint, refusing what layer-by-layer evaluation cannot do."""
    from moeprune.api import choose_layerwise
    from moeprune.store.checkpoint import check_weight_files
    from moeprune.store.novices import is_novice_checkpoint

    check_weight_files(path)
    if is_novice_checkpoint(path):
        if layerwise:
            raise MoepruneError(f"{path} has novices (MoNE), which layer-by-layer evaluation does not run; "
                                "use --in-memory")
        return False, "MoNE checkpoints load whole"
    by_layer, why = choose_layerwise(path, layerwise)
    if by_layer and with_tasks:
        raise MoepruneError(f"lm-eval tasks need {path} whole in memory ({why}); evaluate perplexity alone "
                            "(--text) layer by layer, or pass --in-memory")
    return by_layer, why


def _layerwise_entry(path, texts, tok, seq_len, max_tokens, batch_size, device, progress) -> dict:
    """The report entry of one checkpoint whose perplexities are computed layer by layer."""
    from moeprune.pipeline import ShardedCheckpoint, perplexity_layerwise
    from moeprune.store.checkpoint import checkpoint_parameters

    model_type = ShardedCheckpoint(path).adapter.family
    entry = {"path": str(path), "name": Path(path).resolve().name, "model_type": model_type,
             "parameters": checkpoint_parameters(path), "perplexity": {}, "tasks": {}, "seconds": {"load": 0.0},
             "layerwise": True}
    t0 = time.perf_counter()
    from moeprune.api import layer_progress

    for text in texts:
        with layer_progress(f"{entry['name']}: perplexity on {Path(text).name}", progress) as cb:
            entry["perplexity"][str(text)] = perplexity_layerwise(path, tok, Path(text), seq_len=seq_len,
                                                                  max_tokens=max_tokens, batch_size=batch_size,
                                                                  device=device, progress=cb)
    entry["seconds"]["perplexity"] = time.perf_counter() - t0
    return entry


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
        cells.append(Cell(text, "same") if v == base else Cell(text, f"{d:+.1f} pt", "", None if abs(d) < 0.05 else d > 0))
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
        metrics = [k for k in models[0]["tasks"].get(task, {}) if not k.endswith("_stderr") and k != "samples"]
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
