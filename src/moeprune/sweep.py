"""Quality against pruning ratio: observe once, then plan, apply and evaluate every (method, ratio).

    moeprune sweep MODEL --method uncurl,frequency --ratios 0.125,0.25,0.375,0.5,0.625,0.75 \
        --calib task.jsonl --calib-template "{question} {answer}" --text task.test.txt --out sweep/

This is how a user finds the threshold pruning factor the UNCURL paper (arXiv 2409.01483) reports:
the ratio beyond which quality collapses, which depends on the model's expert count. The
calibration pass runs once; each (method, ratio) is planned from the same statistics and scored by
one walk over the model that prunes each MoE layer as it goes (layer by layer: about one layer in
memory): perplexity on every `--text` file (same windows for every model) and, when asked, lm-eval
tasks (`--tasks`, `--task-dir`, or local tasks built by `--task-text DOMAIN=FILE`), which need the
whole model and a pruned copy of it in memory.

**Where quality falls off (the knee).** Per method, ratios in ascending order, against the unpruned
model:
- `ppl_rel` = geometric mean over the text files of ppl / ppl_unpruned;
- `acc_rel` = mean task `acc` / the unpruned mean `acc`.
The knee is the **first ratio at which `ppl_rel > 1 + threshold` or `acc_rel < 1 - threshold`**
(`--knee-threshold`, default 0.25: a quarter worse). It is None when no ratio tried crosses it.
Also reported is the `steepest` ratio: the end of the largest single step for the worse in log
`ppl_rel` (or in `acc_rel` without texts) between consecutive ratios, the unpruned model being the
first point; it locates a collapse even when every ratio crosses the threshold (None when quality
never gets worse from one ratio to the next).

Outputs in `--out` (written atomically at the end): `sweep.json` (every number, the settings, the
calibration provenance and the knees), `sweep.md` (the table), `sweep.png` (perplexity per text
file and mean accuracy against experts kept, one line per method, each knee marked with an X) and, with
`--save-checkpoints`, `checkpoints/<method>-<kept>/` for every point.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from moeprune.errors import MoepruneError

FORMAT = 1  # of sweep.json
DEFAULT_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


def _mean_acc(tasks: dict) -> float | None:
    accs = [m["acc"] for m in tasks.values() if isinstance(m.get("acc"), (int, float))]
    return sum(accs) / len(accs) if accs else None


def quality(row: dict, base: dict) -> dict:
    """`ppl_rel` (geometric mean of ppl ratios over texts) and `acc_mean` / `acc_rel` of a row against
    `base`."""
    logs = [math.log(row["perplexity"][t]["ppl"] / base["perplexity"][t]["ppl"]) for t in base["perplexity"]]
    acc, base_acc = _mean_acc(row["tasks"]), _mean_acc(base["tasks"])
    return {"ppl_rel": math.exp(sum(logs) / len(logs)) if logs else None, "acc_mean": acc,
            "acc_rel": acc / base_acc if acc is not None and base_acc else None}


def knee(rows: list[dict], threshold: float) -> dict:
    """Where quality falls off for one method's rows (ascending ratio); see the module docstring."""
    rows = sorted(rows, key=lambda r: r["ratio"])
    first = None
    for r in rows:
        bad_ppl = r["ppl_rel"] is not None and r["ppl_rel"] > 1 + threshold
        bad_acc = r["acc_rel"] is not None and r["acc_rel"] < 1 - threshold
        if bad_ppl or bad_acc:
            first = r
            break
    use_ppl = bool(rows) and rows[0]["ppl_rel"] is not None
    # badness levels, the unpruned model first: log ppl_rel (0 unpruned) or -acc_rel (-1 unpruned)
    if use_ppl:
        levels = [0.0] + [math.log(r["ppl_rel"]) for r in rows]
    else:
        levels = [-1.0] + [-(r["acc_rel"] if r["acc_rel"] is not None else 1.0) for r in rows]
    steps = [b - a for a, b in itertools.pairwise(levels)]
    worst = max(range(len(steps)), key=lambda i: (steps[i], -i)) if steps else None
    steepest = rows[worst] if worst is not None and steps[worst] > 0 else None  # only a step that got worse
    return {
        "threshold": threshold,
        "ratio": first["ratio"] if first else None,
        "experts": first["experts"] if first else None,
        "steepest_ratio": steepest["ratio"] if steepest else None,
        "steepest_experts": steepest["experts"] if steepest else None,
        "steepest_by": "log ppl_rel" if use_ppl else "acc_rel",
    }


def sweep(
    model_path: str | Path, methods: list[str], ratios: list[float], calib: str | None, out: str | Path, *,
    texts: list[str | Path] = (), tasks: list[str] = (), task_dir: str | Path | None = None,
    task_texts: dict | None = None, task_items: int = 300, task_seed: int = 0,
    options: dict[str, dict] | None = None, samples: int = 128, seq_len: int = 512, batch_size: int = 8,
    seed: int = 0, probe_size: int = 512, calib_field: str | None = None, calib_template: str | None = None,
    tokenizer: str | None = None, device: str = "cpu", flatten_groups: bool = False, eval_seq_len: int = 512,
    max_tokens: int | None = None, limit: float | None = None, knee_threshold: float = 0.25,
    save_checkpoints: bool = False, force: bool = False, progress: bool = True, command: str | None = None,
    log=None, layerwise: bool | None = None,
) -> dict:
    """Observe once, then plan and evaluate each method at each ratio; write `out`.

    Every point is scored by one walk over the model that prunes each MoE layer as it is reached
    (`pipeline.run.perplexities`), so the checkpoint is read layer by layer and no pruned copy is
    held, unless lm-eval tasks are asked for: they need the whole model, and the unpruned model plus
    one pruned copy (checked against free memory before loading). `options` maps a method name to its
    option dict. `log(str)` receives one line per finished point. Returns the dict written to
    `out/sweep.json`.
    """
    from moeprune.arch import get_adapter
    from moeprune.data import calibration_blocks
    from moeprune.distributed import Ranks
    from moeprune.evaluate import load_tasks, run_tasks, write_tasks
    from moeprune.methods import get_method, make_plan_for
    from moeprune.outputs import atomic_directory, check_offload_dir, check_output_dir
    from moeprune.pipeline import run as pipeline
    from moeprune.pipeline.access import ModelWeights
    from moeprune.pipeline.sources import open_source
    from moeprune.plan import budget
    from moeprune.runtime import check_device, layer_progress
    from moeprune.settings import (
        CalibrationRequest,
        OutputRequest,
        RuntimeRequest,
        check_ratio,
        check_seq_len,
        check_settings,
    )
    from moeprune.store.checkpoint import check_weight_files, load_config, load_tokenizer, parameter_counts
    from moeprune.store.novices import refuse_novice_input
    from moeprune.surgery import apply_plan

    log = log or (lambda line: None)
    options = dict(options or {})
    # ---- every check first, for every method ------------------------------------------------
    refuse_novice_input(model_path, action="sweep")
    if not methods:
        raise MoepruneError("no method to sweep: pass --method NAME[,NAME...]")
    if not ratios:
        raise MoepruneError("no ratio to sweep: pass --ratios R1,R2,... (fractions of experts to remove)")
    if not texts and not tasks and not task_texts:
        raise MoepruneError(
            "nothing to evaluate: give text files (--text) and/or tasks (--tasks, --task-text)"
        )
    for t in texts:
        if not Path(t).is_file():
            raise MoepruneError(f"text file {t} does not exist")
    if not knee_threshold > 0:  # NaN too
        raise MoepruneError(f"--knee-threshold must be positive (got {knee_threshold})")
    unknown = set(options) - set(methods)
    if unknown:
        raise MoepruneError(
            f"options given for {sorted(unknown)}, which are not among the swept methods {methods}"
        )
    check_settings(samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, probe_size=probe_size,
                   task_items=task_items, max_tokens=max_tokens)
    for r in ratios:
        check_ratio(r)
    config = load_config(model_path)
    a = get_adapter(config)
    specs, configs = {}, {}
    for m in methods:
        specs[m] = get_method(m)
        configs[m] = specs[m].default_config(**options.get(m, {}))
        specs[m].check_use(configs[m], n_group=a.n_group, flatten_groups=flatten_groups,
                           has_calibration=calib is not None)
    if calib is not None:
        check_seq_len(seq_len, config)
    keeps = {}
    for ratio in sorted(set(ratios)):
        keeps[ratio] = budget(a.num_experts, a.top_k, ratio=ratio, n_group=a.n_group,
                              min_per_group=a.min_experts_per_group, flatten_groups=flatten_groups,
                              groups_unchanged=all(specs[m].groups_unchanged(configs[m]) for m in methods))
    duplicates = [r for r in keeps if list(keeps.values()).count(keeps[r]) > 1 and r != min(
        q for q in keeps if keeps[q] == keeps[r])]
    for r in duplicates:  # same expert count as a smaller ratio: the same model, evaluated once
        log(f"ratio {r} keeps {keeps[r]} experts, as a smaller ratio does; skipped")
        keeps.pop(r)
    inputs = {
        "model": model_path, "--calib": calib, "--tokenizer": tokenizer, "--task-dir": task_dir,
        **{f"--text {t}": t for t in texts}, **{f"--task-text {t}": t for t in (task_texts or {}).values()},
    }
    check_output_dir(out, force, inputs)
    check_offload_dir(None, inputs)
    check_weight_files(model_path)
    device = check_device(device)
    with_tasks = bool(tasks or task_texts)
    if with_tasks and layerwise:
        raise MoepruneError(
            "lm-eval tasks need the whole model in memory; sweep perplexity alone (--text) layer "
            "by layer, or leave out --layerwise"
        )
    tok = load_tokenizer(tokenizer or model_path)
    cal = None
    if calib is not None:
        cal = calibration_blocks(tok, calib, samples=samples, seq_len=seq_len, seed=seed, field=calib_field,
                                 template=calib_template, vocab_size=getattr(config, "vocab_size", None))

    with ExitStack() as stack:
        suite, names = None, list(tasks)
        if task_texts:
            built_dir = task_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="moeprune-tasks-"))
            built = write_tasks(task_texts, built_dir, n_items=task_items, seed=task_seed)
            names, task_dir = names or built, built_dir
        if names:
            suite = load_tasks(names, task_dir)
        runtime = RuntimeRequest(device=device, batch_size=batch_size,
                                 in_memory=None if layerwise is None else not layerwise, progress=progress)
        # lm-eval scores a model in memory: the unpruned one and, at each point, one pruned copy
        source, _why = open_source(model_path, runtime, needs_whole_model="lm-eval tasks" if suite else None,
                                   copies=2.0)

        def evaluate(plan=None) -> tuple[dict, dict]:
            res = {"perplexity": {}, "tasks": {}}
            what = (
                "evaluating" if plan is None else f"evaluating {plan.method} ({plan.num_experts_out} experts)"
            )
            change = {}
            if texts:
                with layer_progress(what, progress) as cb:
                    ppl, change = pipeline.perplexities(
                        source, tok, [Path(t) for t in texts], seq_len=eval_seq_len, max_tokens=max_tokens,
                        runtime=runtime, plan=plan, stats=stats, progress=cb,
                    )
                res["perplexity"] = {str(t): r for t, r in zip(texts, ppl)}
            if suite is not None:
                model = (
                    source.model
                    if plan is None
                    else apply_plan(copy.deepcopy(source.model), plan, stats=stats)
                )
                res["tasks"] = run_tasks(model, tok, suite, limit=limit, batch_size=batch_size)
                if plan is not None and not texts:
                    after = parameter_counts(model)
                    change = {k: after[k] - before[k] for k in after}
                del model
                gc.collect()
            return res, change

        # ---- observe once, evaluate the unpruned model -------------------------------------------
        t0 = time.perf_counter()
        if cal is not None:
            with layer_progress("calibrating", progress) as cb:
                stats = pipeline.observe(
                    source, cal.input_ids, calib=CalibrationRequest(calib, samples=samples, seq_len=seq_len,
                                                                   seed=seed, probe_size=probe_size),
                    runtime=runtime, calibration=cal.provenance, ranks=Ranks(), progress=cb,
                )
        else:
            stats = pipeline.empty_stats(source.model, str(model_path))
        observe_seconds = time.perf_counter() - t0
        before = pipeline.parameters_before(source)
        t0 = time.perf_counter()
        scores, _ = evaluate()
        base = {"method": None, "ratio": 0.0, "experts": a.num_experts, "parameters": before, **scores}
        base["seconds"] = {"evaluate": time.perf_counter() - t0}
        log(_line(base, base))
        if source.in_memory:
            weights = ModelWeights(source.model)
        else:
            from moeprune.pipeline.access import ShardedWeights

            weights = ShardedWeights(source)

        with atomic_directory(out, force=force) as tmp:
            rows = []
            for method in methods:
                for ratio, keep in keeps.items():
                    t0 = time.perf_counter()
                    plan = make_plan_for(
                        stats, method, ratio=ratio, flatten_groups=flatten_groups, weights=weights,
                        options=options.get(method),
                    )
                    t1 = time.perf_counter()
                    scores, change = evaluate(plan)
                    t2 = time.perf_counter()
                    parameters = {k: v + change.get(k, 0) for k, v in before.items()}
                    row = {
                        "method": method, "ratio": ratio, "experts": keep, "parameters": parameters, **scores,
                    }
                    row.update(quality(row, base))
                    row["seconds"] = {"plan": t1 - t0, "evaluate": t2 - t1}
                    row["checkpoint"] = None
                    if save_checkpoints:
                        ckpt = tmp / "checkpoints" / f"{method}-{keep}"
                        ckpt.parent.mkdir(exist_ok=True)
                        pipeline.apply(source, plan, OutputRequest(ckpt, command=command), stats=stats)
                        row["checkpoint"] = str(Path(out) / "checkpoints" / ckpt.name)
                    rows.append(row)
                    log(_line(row, base))
            base.update(quality(base, base))
            result = {
                "format": FORMAT,
                "model": str(model_path),
                "model_type": a.family,
                "num_experts": a.num_experts,
                "top_k": a.top_k,
                "methods": list(methods),
                "ratios": list(keeps),
                "options": options,
                "calibration": dict(stats.calibration),
                "observe_seconds": observe_seconds,
                "settings": {
                    "eval_seq_len": eval_seq_len, "max_tokens": max_tokens, "batch_size": batch_size,
                    "limit": limit, "device": device, "flatten_groups": flatten_groups,
                    "knee_threshold": knee_threshold, "probe_size": probe_size, "samples": samples,
                    "seq_len": seq_len, "seed": seed, "layerwise": not source.in_memory,
                },
                "texts": [str(t) for t in texts],
                "tasks": suite.names if suite else [],
                "command": command,
                "baseline": base,
                "rows": rows,
                "knee": {m: knee([r for r in rows if r["method"] == m], knee_threshold) for m in methods},
            }
            (tmp / "sweep.json").write_text(json.dumps(result, indent=1))
            (tmp / "sweep.md").write_text(render_markdown(result))
            plot(result, tmp / "sweep.png")
    return result


def _line(row: dict, base: dict) -> str:
    name = "unpruned" if row["method"] is None else f"{row['method']} ratio {row['ratio']:g}"
    ppl = ", ".join(f"ppl {Path(t).name} {v['ppl']:.3f}" for t, v in row["perplexity"].items())
    acc = _mean_acc(row["tasks"])
    return f"{name} ({row['experts']} experts): {ppl}" + (f", mean acc {acc:.3f}" if acc is not None else "")


# ---- tables and plot ------------------------------------------------------------------------------

def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the quality-vs-ratio table; the knee rows are marked with ◀."""
    texts = result["texts"]
    names = [Path(t).name if sum(Path(u).name == Path(t).name for u in texts) == 1 else t for t in texts]
    head = ["method", "ratio", "experts"] + [f"ppl {n}" for n in names] + ["ppl ×"]
    has_tasks = bool(result["tasks"])
    if has_tasks:
        head += ["mean acc"]
    head += ["knee"]
    out = []
    for row in [result["baseline"]] + result["rows"]:
        k = result["knee"].get(row["method"]) or {}
        mark = []
        if row["method"] is not None and k.get("ratio") == row["ratio"]:
            mark.append("falls off")
        if row["method"] is not None and k.get("steepest_ratio") == row["ratio"]:
            mark.append("steepest")
        cells = [row["method"] or "unpruned", f"{row['ratio']:g}", str(row["experts"])]
        cells += [f"{row['perplexity'][t]['ppl']:.3f}" for t in texts]
        cells += [f"{row['ppl_rel']:.3f}" if row.get("ppl_rel") is not None else "—"]
        if has_tasks:
            cells += [f"{row['acc_mean']:.3f}" if row.get("acc_mean") is not None else "—"]
        cells += [" ◀ " + ", ".join(mark) if mark else ""]
        out.append(cells)
    return head, out


def knee_sentences(result: dict) -> list[str]:
    lines = []
    for m, k in result["knee"].items():
        steep = f"; steepest step at ratio {k['steepest_ratio']:g} ({k['steepest_experts']} experts kept)" \
            if k["steepest_ratio"] is not None else ""
        if k["ratio"] is None:
            lines.append(
                f"{m}: quality stays within {k['threshold']:.0%} of the unpruned model up to the largest "
                f"ratio tried{steep}"
            )
        else:
            lines.append(
                f"{m}: quality falls off at ratio {k['ratio']:g} ({k['experts']} of "
                f"{result['num_experts']} experts kept; more than {k['threshold']:.0%} worse){steep}"
            )
    return lines


def settings_line(result: dict) -> str:
    """The settings the numbers depend on, with the flags that reproduce them."""
    st, cal = result.get("settings", {}), result.get("calibration", {})
    samples, seq_len = cal.get("samples", st.get("samples")), cal.get("seq_len", st.get("seq_len"))
    parts = [f"calibration {samples} × {seq_len} tokens, seed {st.get('seed')} "
             f"(`--samples {st.get('samples')} --seq-len {st.get('seq_len')}`)",
             f"perplexity in {st.get('eval_seq_len')}-token windows "
             f"(`--eval-seq-len {st.get('eval_seq_len')}`)"]
    if st.get("max_tokens"):
        parts.append(f"first {st['max_tokens']:,} tokens of each text (`--max-tokens {st['max_tokens']}`)")
    parts.append(f"knee threshold {st.get('knee_threshold')}")
    return "Settings: " + "; ".join(parts) + "."


def render_markdown(result: dict) -> str:
    head, rows = table_rows(result)
    lines = [settings_line(result), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.strip() for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in knee_sentences(result)) + "\n"


def render_table(result: dict):
    """A rich Table of the sweep."""
    from rich.table import Table

    head, rows = table_rows(result)
    t = Table(
        title=f"{Path(result['model']).name}: quality against pruning ratio "
        f"({result['num_experts']} experts, top-{result['top_k']})"
    )
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 or h == "knee" else "right")
    for r in rows:
        t.add_row(*r)
    return t


def plot(result: dict, path: str | Path) -> Path:
    """PNG: perplexity per text (log scale) and mean accuracy against experts kept, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    texts, has_tasks = result["texts"], bool(result["tasks"])
    panels = [("ppl", t) for t in texts] + ([("acc", None)] if has_tasks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    base, E = result["baseline"], result["num_experts"]
    for ax, (kind, text) in zip(axes[0], panels):
        for m in result["methods"]:
            rows = sorted([r for r in result["rows"] if r["method"] == m], key=lambda r: -r["experts"])
            pts = [base] + rows

            def value(r, kind=kind, text=text):
                return r["perplexity"][text]["ppl"] if kind == "ppl" else r.get("acc_mean")

            xs = [r["experts"] for r in pts if value(r) is not None]
            ys = [value(r) for r in pts if value(r) is not None]
            (line,) = ax.plot(xs, ys, marker=".", markersize=6, label=m)
            k = result["knee"][m]
            hit = [r for r in rows if r["ratio"] == k["ratio"] and value(r) is not None]
            if hit:
                # A marker no ordinary point uses, so the knee stands out whatever the line colours.
                ax.plot([hit[0]["experts"]], [value(hit[0])], linestyle="none", marker="X", markersize=13,
                        markerfacecolor=line.get_color(), markeredgecolor="black", markeredgewidth=1,
                        label=f"{m}: falls off", zorder=3)
        ref = base["perplexity"][text]["ppl"] if kind == "ppl" else base.get("acc_mean")
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel(f"experts kept per layer (of {E})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # expert counts are whole numbers
        ax.invert_xaxis()
        if kind == "ppl":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.set_ylabel("perplexity (log scale)")
            ax.set_title(f"perplexity on {Path(text).name}")
        else:
            ax.set_ylabel("mean accuracy")
            ax.set_title(f"mean acc over {len(result['tasks'])} task(s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['model']).name}: quality against experts kept (X: where quality falls off)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
