"""How much quality a checkpoint kept: perplexity, lm-eval tasks, and side-by-side reports.

    from moeprune.evaluation import evaluate_models
    from moeprune.evaluate import render_table
    report = evaluate_models(["base/", "pruned/"], texts=["prose.test.txt"],
                             task_texts={"prose": "prose.test.txt"})
    rich.print(render_table(report))

- `perplexity`: non-overlapping fixed windows, ragged tail dropped (see `perplexity.py`).
- `write_tasks`: local zero-shot tasks (4-way continuation choice, last-word cloze) from a `.txt`.
- `run_tasks` / `load_tasks`: lm-eval on a model held in memory (needs `moeprune[eval]`).
- `render_table`, `render_markdown`: side-by-side reports of `moeprune.evaluation.evaluate_models`.
"""

from moeprune.evaluate.harness import TaskSuite, load_tasks, run_tasks
from moeprune.evaluate.perplexity import perplexity
from moeprune.evaluate.report import comparison_rows, render_markdown, render_table
from moeprune.evaluate.tasks import cloze_items, mc_items, parse_task_texts, task_name, write_tasks

__all__ = [
    "TaskSuite",
    "cloze_items",
    "comparison_rows",
    "load_tasks",
    "mc_items",
    "parse_task_texts",
    "perplexity",
    "render_markdown",
    "render_table",
    "run_tasks",
    "task_name",
    "write_tasks",
]
