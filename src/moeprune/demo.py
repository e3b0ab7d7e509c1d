"""`moeprune demo`: the whole flow on the offline testbed, before and after, in one command.

Builds (or reuses) the trained `demo-mixtral` testbed (a couple of minutes on 2 cores the first
time; it resumes if interrupted), prunes a share of its experts with one or more methods, evaluates
every model on held-out prose and code (perplexity and the testbed's zero-shot tasks), and returns
one report that `render_demo` lays out on one screen. Everything is cached under the testbed cache:
a second run reuses the testbed, each pruned checkpoint and each model's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from moeprune.errors import MoepruneError

# The method that kept most quality on mixtral-8e at 25% in benchmarks/quality.py (perplexity
# 1.003x the original; see benchmarks/results/quality.md).
DEFAULT_METHOD = "frequency"
DEMO_TESTBED = "demo-mixtral"
EVAL_FORMAT = 1  # bump when a cached evaluation entry would no longer match what is computed


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_json(path: Path, obj: dict) -> None:
    from moeprune.testbed.cache import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_methods(text: str) -> list[str]:
    """'reap, frequency' -> ['reap', 'frequency'], each a registered method, none twice."""
    from moeprune.methods import METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise MoepruneError(f"no method in {text!r}: give comma-separated names, e.g. frequency,reap")
    for m in names:
        if m not in METHODS:
            raise MoepruneError(f"unknown method {m!r}; known: {', '.join(sorted(METHODS))}")
    if len(set(names)) != len(names):
        raise MoepruneError(f"a method is named twice in {text!r}")
    return names


def run_demo(*, methods: Sequence[str] = (DEFAULT_METHOD,), ratio: float = 0.25, testbed: str = DEMO_TESTBED,
             samples: int = 128, max_tokens: int = 16384, task_items: int = 100, cache_dir: str | None = None,
             rebuild: bool = False, strict: bool = True, say: Callable[[str], None] = _say) -> dict:
    """Run the demo and return its report: `evaluate_models`'s shape plus a "demo" section.

    `methods` are pruned side by side at the same `ratio`; the first model in the report is the
    original. Calibration uses `samples` windows of the testbed's training length from the mixed
    training split; perplexity and tasks use the test split.
    """
    from moeprune.api import prune
    from moeprune.evaluation import evaluate_models
    from moeprune.plan import Plan
    from moeprune.testbed import train as tb

    methods = list(methods)
    if not methods:
        raise MoepruneError("no method to run")
    if not 0 < ratio < 1:
        raise MoepruneError(f"--ratio must be between 0 and 1 (got {ratio})")
    started = time.perf_counter()
    say(f"[1/3] testbed {testbed}: build or reuse (the first time it trains for a few minutes; "
        "Ctrl-C is safe, a re-run resumes)")
    base = tb.get_testbed(testbed, cache_dir, progress=True, strict=strict)
    corpus = tb.build_corpus(cache_dir)
    # The testbed's own thread count for pruning and evaluation too: the same numbers on every
    # machine, and no thread stalled behind another process's work on a shared core.
    threads = tb.TESTBEDS[testbed].threads
    base_report = json.loads((base / "testbed_report.json").read_text())
    seq_len = int(base_report["train"]["seq_len"])  # evaluate at the length the model was trained on
    demo_dir = tb.cache_root(cache_dir) / "demo"

    pruned: dict[str, Path] = {}
    for i, method in enumerate(methods, 1):
        out = demo_dir / f"{base.name}-{method}-{round(ratio * 1000)}"
        settings = {"samples": samples, "seq_len": seq_len, "seed": 0, "ratio": ratio}
        stamp = out / "demo_settings.json"
        plan_file = out / "moeprune_plan.json"
        fresh = (stamp.is_file() and json.loads(stamp.read_text()) == settings
                 and plan_file.is_file() and Plan.load(plan_file).method == method)
        step = f"[2/3] ({i}/{len(methods)})" if len(methods) > 1 else "[2/3]"
        if fresh and not rebuild:
            say(f"{step} reusing the {method} checkpoint {out}")
        else:
            say(f"{step} pruning {ratio:.0%} of the experts with {method}, "
                "calibrated on the mixed training split")
            with tb.torch_threads(threads):
                prune(base, method, out, ratio=ratio, calib=str(corpus.path("mixed", "train")), force=True,
                      command=f"moeprune demo --method {method} --ratio {ratio}",
                      samples=samples, seq_len=seq_len, seed=0)
            _write_json(stamp, settings)
        pruned[method] = out

    texts = [corpus.path("prose", "test"), corpus.path("code", "test")]
    shared = {"format": EVAL_FORMAT, "max_tokens": max_tokens, "task_items": task_items, "seq_len": seq_len,
              "corpus": corpus.version}
    paths = [base, *pruned.values()]
    # Each model's evaluation is cached beside it (the base's in the demo directory, since the
    # testbed directory is the testbed's own), keyed by the settings and by what the model is.
    caches = [demo_dir / f"{base.name}-original.eval.json"] + [p / "demo_eval.json" for p in pruned.values()]
    keys = [dict(shared, model=base.name)] + [
        dict(shared, model=p.name, plan_sha256=_sha256(p / "moeprune_plan.json")) for p in pruned.values()]
    entries: list[dict | None] = []
    for cache, key in zip(caches, keys, strict=True):
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        entries.append(cached if cached.get("key") == key and not rebuild else None)
    todo = [i for i, e in enumerate(entries) if e is None]
    if todo:
        say(f"[3/3] evaluating {len(todo)} model(s) on the held-out test split "
            f"({len(paths) - len(todo)} evaluation(s) reused)")
        with tb.torch_threads(threads):
            fresh_report = evaluate_models(
                [paths[i] for i in todo], texts=texts, task_texts={"prose": texts[0], "code": texts[1]},
                task_items=task_items, max_tokens=max_tokens, seq_len=seq_len, progress=True)
        common = {k: fresh_report[k] for k in ("format", "settings", "texts", "tasks", "task_manifest")}
        for i, model_entry in zip(todo, fresh_report["models"], strict=True):
            entries[i] = {"key": keys[i], "common": common, "model": model_entry}
            _write_json(caches[i], entries[i])
    else:
        say("[3/3] reusing the evaluation of every model (--rebuild redoes pruning and evaluation)")

    from moeprune.store.files import weights_bytes

    report = dict(entries[0]["common"])
    report["models"] = []
    plans = {m: Plan.load(p / "moeprune_plan.json") for m, p in pruned.items()}
    for i, (e, path) in enumerate(zip(entries, paths, strict=True)):
        m = dict(e["model"])
        # "+fit": the layers were refitted to the original's outputs (`prune`'s default compensation)
        m["name"] = "original" if i == 0 else (f"{methods[i - 1]} -{ratio:.0%}"
                                               + (" +fit" if plans[methods[i - 1]].compensation else ""))
        m["bytes_on_disk"] = weights_bytes(path)
        report["models"].append(m)
    first_plan = next(iter(plans.values()))
    report["demo"] = {
        "testbed": testbed, "base": str(base), "ratio": ratio, "methods": methods,
        "pruned": {m: str(p) for m, p in pruned.items()},
        "experts": {"original": first_plan.num_experts_in,
                    **{m: p.num_experts_out for m, p in plans.items()}},
        "novices": {m: max((len(lp.novices) for lp in p.layers), default=0) for m, p in plans.items()},
        "compensation": {m: p.compensation.get("fit", "none") for m, p in plans.items()},
        "testbed_validation": {d: {"perplexity": v["perplexity"], "bigram_perplexity": v["bigram_perplexity"]}
                               for d, v in base_report["evaluation"]["domains"].items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report


# ---------------------------------------------------------------------------------------------
# One screen

_TASK = re.compile(r"^moeprune_([a-z0-9_]+)_(mc|cloze)$")
# What each local task asks, and what guessing scores (the cloze needs the exact word, greedily).
_KIND = {"mc": ("real continuation (of 4)", "25%"), "cloze": ("last word of a line", "≈0%")}


def task_label(name: str) -> tuple[str, str]:
    """('prose: real continuation (of 4)', '25%') for 'moeprune_prose_mc': label, chance level."""
    m = _TASK.match(name)
    if not m:
        return name, ""
    what, chance = _KIND[m.group(2)]
    return f"{m.group(1)}: {what}", chance


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def render_demo(report: dict):
    """A rich Table: the original and each pruned model side by side, changes against the original."""
    from rich.table import Table

    d, models = report["demo"], report["models"]
    base = models[0]
    methods = d["methods"]
    title = (f"{d['testbed']}: the original and {', '.join(methods)} with {d['ratio']:.0%} of the experts "
             "removed (held-out test split)")
    t = Table(title=title, title_justify="left")
    t.add_column("")
    t.add_column("chance", justify="right", style="dim")
    for m in models:
        t.add_column(m["name"], justify="right")

    def change(v: float, ref: float, kind: str) -> str:
        if kind == "ratio":  # perplexity: the factor is what matters, lower is better
            colour = "green" if v < ref else "red" if v > ref else "dim"
            return f"[{colour}]{v / ref:.3f}×[/]"
        colour = "dim"
        return f"[{colour}]{100 * (v - ref) / ref:+.1f}%[/]" if ref else ""

    experts = [str(d["experts"]["original"])] + [
        f"{d['experts'][m]}" + (f" + {d['novices'][m]} novices" if d["novices"].get(m) else "")
        for m in methods]
    t.add_row("experts per MoE layer", "", *experts)
    total = [m["parameters"]["total"] for m in models]
    t.add_row("parameters", "", _params(total[0]),
              *[f"{_params(v)} {change(v, total[0], 'pct')}" for v in total[1:]])
    size = [m.get("bytes_on_disk") for m in models]
    t.add_row("weights on disk", "", _mb(size[0]),
              *[f"{_mb(v)} {change(v, size[0], 'pct')}" if v and size[0] else _mb(v) for v in size[1:]])
    for text in report["texts"]:
        domain = Path(text).name.split(".")[0]
        ppl = [m["perplexity"].get(text, {}).get("ppl") for m in models]
        t.add_row(f"perplexity, {domain}", "", f"{ppl[0]:.1f}",
                  *[f"{v:.1f} {change(v, ppl[0], 'ratio')}" for v in ppl[1:]])
    for task in report["tasks"]:
        acc = [m["tasks"].get(task, {}).get("acc") for m in models]
        if acc[0] is None:
            continue
        cells = [f"{100 * acc[0]:.1f}%"]
        for v in acc[1:]:
            delta = 100 * (v - acc[0])
            colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
            cells.append(f"{100 * v:.1f}% [{colour}]{delta:+.1f} pt[/]")
        t.add_row(*task_label(task), *cells)
    items = {v.get("items") for v in (report.get("task_manifest") or {}).get("tasks", {}).values()}
    stderr = [base["tasks"][k].get("acc_stderr") for k in report["tasks"] if base["tasks"].get(k)]
    if items and stderr:
        n = max(i for i in items if i)
        worst = 100 * max(s for s in stderr if s)
        t.caption = (f"perplexity: lower is better, × the original's. Tasks: {n} items each, standard "
                     f"error about ±{worst:.0f} pt; this small model is near chance on them, so perplexity "
                     "is the signal")
        if any(" +fit" in m["name"] for m in report["models"]):
            t.caption += ("; +fit: each pruned layer refitted to the original's output (`moeprune prune`'s "
                          "default compensation)")
        t.caption_justify = "left"
    return t


def next_steps(report: dict) -> list[str]:
    """Lines saying where each checkpoint is, how to load it, and what to try next."""
    from moeprune.methods import METHODS

    d = report["demo"]
    lines = [f"original:  {d['base']}"]
    for m in d["methods"]:
        lines.append(f"{m} ({METHODS[m].summary}): {d['pruned'][m]}")
    first = d["methods"][0]
    path = d["pruned"][first]
    if d["novices"].get(first):
        lines.append(f"load it:   python -c \"import moeprune; m = moeprune.from_pretrained('{path}')\"")
    else:
        lines.append("load it:   python -c \"from transformers import AutoModelForCausalLM; "
                     f"m = AutoModelForCausalLM.from_pretrained('{path}')\"")
    others = [m for m in ("reap", "mone", "frequency", "ean") if m not in d["methods"]]
    lines.append(f"try:       moeprune demo --method {others[0]} --ratio 0.5   |   "
                 f"moeprune demo --compare {','.join([first, *others[:2]])}   |   moeprune methods")
    return lines
