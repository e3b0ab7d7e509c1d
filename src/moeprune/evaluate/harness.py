"""The bridge to lm-eval: run its tasks (its own or local YAML ones) on a model held in memory.

lm-eval is an optional extra (`pip install 'moeprune[eval]'`) and is imported only when a task is
run. Tasks are resolved and their data loaded by `load_tasks` *before* any model is loaded, so a
misspelt name or an unreachable dataset fails in one line, early. When every requested name is
defined in the local task directory, lm-eval's own ~15k task configs are not indexed (that takes
seconds); otherwise they are.

Checked with lm-eval 0.4.13, transformers 5.23 and torch 2.13 (CPU): `HFLM(pretrained=model,
tokenizer=tok)` works unchanged on the tiny models of every supported family and on the testbed
models; no patch is needed. lm-eval's `perplexity`-type metrics bootstrap their stderr in a
process pool of one process per CPU, which is why the local tasks report accuracy only and
`bootstrap_iters` is small here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoepruneError


def _require_lm_eval():
    """The lm_eval package, or a MoepruneError telling the user to install the extra."""
    try:
        import lm_eval
        import lm_eval.tasks  # the submodules used below
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise MoepruneError(f"lm-eval tasks need the eval extra: pip install 'moeprune[eval]' ({e})")
    return lm_eval


@contextmanager
def _quiet():
    """Silence lm-eval's info/warning logs and datasets' progress bars, then restore them.

    HFLM warns on every in-memory model that "many model arguments may be ignored", which is
    expected here; errors still show. The hub client's retries of an unreachable dataset do show:
    they take tens of seconds, and a silent wait would look like a hang.
    """
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if not bars_were_disabled:
            enable_progress_bars()


@contextmanager
def _stderr_captured():
    """Keep what lm-eval writes to stderr while it runs from the screen, and replay it if it fails.

    That is tqdm's progress bars (one per request type and task) and the "fatal: not a git
    repository" of the `git describe` subprocess lm-eval runs to record a commit hash. Both the
    Python stream and file descriptor 2 (which a subprocess inherits) are redirected for the
    block only, then restored.
    """
    sink = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    sys.stderr.flush()
    try:
        saved_fd = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon): only the Python stream can be redirected
        saved_fd = None
    try:
        if saved_fd is not None:
            os.dup2(sink.fileno(), 2)
        with redirect_stderr(sink):
            yield
    except BaseException:
        sink.flush()
        sink.seek(0)
        tail = sink.read()[-4000:]
        _restore_fd(saved_fd)
        saved_fd = None
        sys.stderr.write(tail)
        raise
    finally:
        _restore_fd(saved_fd)
        sink.close()


def _restore_fd(saved_fd: int | None) -> None:
    if saved_fd is not None:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _is_fetch_error(e: BaseException) -> bool:
    """Whether loading a task failed for want of its data (network, hub, offline mode, missing file)."""
    while e is not None:
        module = type(e).__module__ or ""
        if isinstance(e, (OSError, TimeoutError)) or module.split(".")[0] in (
                "datasets", "huggingface_hub", "requests", "httpx", "urllib3", "fsspec"):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass
class TaskSuite:
    """Resolved task names and the lm-eval TaskManager that knows them; reusable across models."""

    names: list[str]
    task_manager: object
    task_dir: Path | None


def load_tasks(tasks: Sequence[str], task_dir: str | Path | None = None, *,
               include_defaults: bool | None = None) -> TaskSuite:
    """Resolve `tasks` (lm-eval names, or names in the YAML directory `task_dir`) and load their data.

    `include_defaults` says whether lm-eval's own tasks are searched too; by default only when a
    name is not found in `task_dir`. Raises a one-line MoepruneError for an unknown name or for
    data that could not be fetched.
    """
    lm_eval = _require_lm_eval()
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise MoepruneError("no tasks given")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise MoepruneError(f"task directory {task_dir} does not exist")
    include = str(Path(task_dir).resolve()) if task_dir is not None else None
    TaskManager = lm_eval.tasks.TaskManager
    with _quiet():
        local = TaskManager(include_path=include, include_defaults=False) if include else None
        if include_defaults is None:
            include_defaults = local is None or any(n not in local.all_tasks for n in names)
        tm = TaskManager(include_path=include) if include_defaults or local is None else local
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            hint = f"; tasks in {task_dir}: {', '.join(local.all_tasks)}" if local and local.all_tasks else ""
            raise MoepruneError(f"unknown lm-eval task {unknown[0]!r} (see `lm-eval ls tasks`){hint}")
        for name in names:
            try:
                # loading builds the task, which downloads (or reads the cache of) its dataset
                tm.load([name]) if hasattr(tm, "load") else lm_eval.tasks.get_task_dict([name], tm)
            except Exception as e:  # noqa: BLE001  # any failure becomes one line naming the task
                if _is_fetch_error(e):
                    offline = any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_DATASETS_OFFLINE",
                                                                                    "HF_HUB_OFFLINE"))
                    hint = "" if offline else " (HF_DATASETS_OFFLINE=1 fails at once instead of retrying)"
                    raise MoepruneError(
                        f"the data of lm-eval task {name!r} could not be fetched ({_one_line(e)}); "
                        f"it needs the Hugging Face Hub or a local datasets cache{hint}"
                    )
                raise MoepruneError(f"could not load lm-eval task {name!r} ({_one_line(e)})")
    return TaskSuite(names, tm, Path(include) if include else None)


def _flatten(results: dict, samples: dict) -> dict[str, dict]:
    """lm-eval's {"task": {"acc,none": x, "acc_stderr,none": s, ...}} -> {"task": {"acc": x, ...}}."""
    out = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not filt or not (numeric or value == "N/A"):
                continue  # alias, name, sample_len: not metrics
            row[metric if filt == "none" else key] = float(value) if numeric else None  # "N/A": no stderr
        if row:
            n = samples.get(task, {})
            row["samples"] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else None
            out[task] = row
    return out


def run_tasks(
    model, tokenizer, tasks: Sequence[str] | TaskSuite, *, task_dir: str | Path | None = None,
    limit: float | None = None, batch_size: int = 8, seed: int = 0, bootstrap_iters: int = 1000,
) -> dict[str, dict]:
    """Run lm-eval tasks zero-shot on an in-memory causal LM; return {task: {metric: value}}.

    `tasks` are names (resolved with `load_tasks(tasks, task_dir)`) or an already resolved
    TaskSuite. `limit` keeps the first N items of each task (or a fraction if < 1). Each row holds
    the metrics without lm-eval's ",none" filter suffix (e.g. `acc`, `acc_stderr`, `acc_norm`) and
    `samples`, the number of items scored. lm-eval reseeds python, numpy and torch from `seed`.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    suite = tasks if isinstance(tasks, TaskSuite) else load_tasks(tasks, task_dir)
    with _quiet(), _stderr_captured():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=list(suite.names), task_manager=suite.task_manager, limit=limit,
                bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except Exception as e:
            if _is_fetch_error(e):
                raise MoepruneError(
                    f"the data of lm-eval tasks {', '.join(suite.names)} could not be fetched "
                    f"({_one_line(e)}); it needs the Hugging Face Hub or a local datasets cache"
                )
            raise
    return _flatten(res["results"], res.get("n-samples", {}))
