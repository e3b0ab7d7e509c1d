"""The eval driver: several checkpoints scored the same way, through the pipeline, as one dict.

Each checkpoint is a weight source (`moeprune.pipeline.sources.open_source`): read one decoder layer at a time
for perplexity, loaded whole only for lm-eval tasks (after the estimate of its peak is checked) or when it
has novices (MoNE checkpoints load through `moeprune.from_pretrained`). Perplexity is the pipeline's
(`pipeline.run.perplexity`) for both, so the numbers do not depend on which way was taken. Everything
that can be checked without weights (paths, families, text files, task names and task data) is
checked before the first checkpoint is read. `moeprune.evaluate.report` lays the dict out.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
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
    run with the experts kernel their config names. Perplexity is computed one decoder layer at a
    time unless `layerwise=False`; lm-eval tasks need the whole model. `notify(message)` hears the choice.

    Returns {"format", "settings", "texts", "tasks", "task_manifest", "models": [per checkpoint:
    {"path", "name", "model_type", "parameters", "perplexity": {text: {...}}, "tasks": {task:
    {metric: value}}, "seconds": {...}}]}.
    """
    from moeprune import __version__
    from moeprune.arch import get_adapter
    from moeprune.evaluate.harness import run_tasks
    from moeprune.pipeline.run import perplexities
    from moeprune.pipeline.sources import open_source
    from moeprune.runtime import check_device, layer_progress
    from moeprune.settings import RuntimeRequest
    from moeprune.store.checkpoint import (
        check_weight_files,
        checkpoint_parameters,
        load_config,
        load_tokenizer,
    )
    from moeprune.store.novices import is_novice_checkpoint

    if not paths:
        raise MoepruneError("no model to evaluate")
    if not texts and not tasks and not task_texts:
        raise MoepruneError(
            "nothing to evaluate: give text files (--text) and/or tasks (--tasks, --task-text)"
        )
    if seq_len < 2 or batch_size < 1 or (max_tokens is not None and max_tokens < seq_len):
        raise MoepruneError(f"need --seq-len >= 2, --batch-size >= 1 and --max-tokens >= --seq-len "
                            f"(got {seq_len}, {batch_size}, {max_tokens})")
    with_tasks = bool(tasks or task_texts)
    for p in paths:
        config = load_config(p)
        get_adapter(config)
        max_pos = getattr(config, "max_position_embeddings", None)
        if texts and isinstance(max_pos, int) and seq_len > max_pos:
            raise MoepruneError(f"--seq-len {seq_len} exceeds the max_position_embeddings {max_pos} of {p}; "
                                f"use --seq-len {max_pos} or less")
        check_weight_files(p)
        if is_novice_checkpoint(p) and layerwise:
            raise MoepruneError(f"{p} has novices (MoNE), which layer-by-layer evaluation does not run; "
                                "use --in-memory")
        if with_tasks and layerwise:
            raise MoepruneError(
                f"lm-eval tasks need {p} whole in memory (as asked); evaluate perplexity alone "
                "(--text) layer by layer, or pass --in-memory"
            )
    for t in texts:
        if not Path(t).exists():
            raise MoepruneError(f"text file {t} does not exist")
    device = check_device(device)
    runtime = RuntimeRequest(
        device=device, batch_size=batch_size, in_memory=None if layerwise is None else not layerwise
    )
    tokenizers = [load_tokenizer(tokenizer or p) for p in paths]

    with ExitStack() as stack:
        suite, manifest = _task_setup(stack, tasks, task_dir, task_texts, task_items, task_seed)
        report = {
            "format": FORMAT,
            "moeprune_version": __version__,
            "settings": {
                "seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size, "limit": limit,
                "device": device, "task_items": task_items if task_texts else None,
                "task_seed": task_seed if task_texts else None,
            },
            "texts": [str(t) for t in texts],
            "tasks": suite.names if suite else [],
            "task_manifest": manifest,
            "models": [],
        }
        for path, tok in zip(paths, tokenizers):
            t0 = time.perf_counter()
            needs = (
                "lm-eval tasks"
                if suite is not None
                else "MoNE checkpoints"
                if is_novice_checkpoint(path)
                else None
            )
            source, why = open_source(path, runtime, needs_whole_model=needs)
            if notify is not None:
                notify(f"{path}: {'whole model in memory' if source.in_memory else 'layer by layer'} ({why})")
            entry = {
                "path": str(path), "name": Path(path).resolve().name, "model_type": source.adapter.family,
                "parameters": checkpoint_parameters(path), "perplexity": {}, "tasks": {},
                "seconds": {"load": time.perf_counter() - t0},
            }
            if not source.in_memory:
                entry["layerwise"] = True
            t0 = time.perf_counter()
            if texts:  # every text in one walk: each layer is read once per checkpoint
                names = ", ".join(Path(t).name for t in texts)
                with layer_progress(f"{entry['name']}: perplexity on {names}", progress) as cb:
                    results, _ = perplexities(source, tok, [Path(t) for t in texts], seq_len=seq_len,
                                              max_tokens=max_tokens, runtime=runtime, progress=cb)
                entry["perplexity"] = {str(t): r for t, r in zip(texts, results)}
            entry["seconds"]["perplexity"] = time.perf_counter() - t0
            if suite is not None:
                t0 = time.perf_counter()
                entry["tasks"] = run_tasks(source.model, tok, suite, limit=limit, batch_size=batch_size)
                entry["seconds"]["tasks"] = time.perf_counter() - t0
            report["models"].append(entry)
            del source
            gc.collect()
    return report
