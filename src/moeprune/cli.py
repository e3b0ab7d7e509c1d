"""The `moeprune` command line: parses flags, calls the public API, prints tables.

Any MoepruneError becomes one line on stderr and exit status 2; nothing is written on failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moeprune.errors import MoepruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Mixture-of-Experts LLMs smaller without retraining.")
out = Console()
err = Console(stderr=True)

Ratio = Annotated[float | None, typer.Option("--ratio", help="fraction of routed experts to remove per layer")]
Experts = Annotated[int | None, typer.Option("--experts", help="routed experts to keep per layer")]
Options = Annotated[list[str] | None, typer.Option("--option", "-o", help="method option KEY=VALUE (repeatable)")]
Flatten = Annotated[bool, typer.Option("--flatten-groups", help="route without expert groups (n_group=topk_group=1)")]
Force = Annotated[bool, typer.Option("--force", help="replace a non-empty output directory")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto")]
Layerwise = Annotated[bool | None, typer.Option(
    "--layerwise/--in-memory",
    help="read, prune and write one decoder layer at a time in bounded memory, or load the whole model "
         "[default: layer by layer when the weights exceed half the free memory]")]
OffloadDir = Annotated[str | None, typer.Option(
    help="where hidden states beyond --hidden-memory go during layer-by-layer work [default: the temp directory]")]
HiddenMemory = Annotated[float, typer.Option(
    help="GiB of calibration hidden states kept in memory between layers (layer by layer); the rest go to files")]
CalibTemplate = Annotated[str | None, typer.Option(
    "--calib-template", help="build each .jsonl row's text from several fields, e.g. 'Q: {question} A: {answer}'")]


def _command_line() -> str:
    return "moeprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _write_atomically(path: str | Path, write) -> None:
    """`write(tmp)` a sibling temporary file, then rename it onto `path`, so a failure leaves no half file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    write(tmp)
    tmp.replace(path)


def _parse_options(method: str, pairs: list[str] | None) -> dict:
    """KEY=VALUE strings -> typed keyword arguments of the method's config dataclass."""
    from moeprune.methods import get_method

    spec = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in fields:
            raise MoepruneError(f"bad --option {pair!r}: method {method} takes KEY=VALUE with KEY in "
                                f"{sorted(fields) or 'nothing'}")
        kind = fields[key].type if isinstance(fields[key].type, type) else eval(str(fields[key].type))
        if kind is bool:
            options[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            try:
                options[key] = kind(value)
            except ValueError:
                raise MoepruneError(f"bad --option {pair!r}: {key} must be a {kind.__name__}")
    return options


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="model directory")],
            as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Family, MoE layers, experts, top-k, shared experts, and where the parameters are."""
    from moeprune.api import inspect as inspect_model

    info = inspect_model(model)
    if as_json:
        out.print_json(json.dumps(info))
        return
    t = Table(title=f"{model}", show_header=False)
    p = info["parameters"]
    rows = [
        ("family", f"{info['model_type']} ({info['architecture']})"),
        ("layers", f"{info['num_layers']}: MoE {info['moe_layers']}, dense {info['dense_layers'] or 'none'}"),
        ("routed experts", f"{info['num_experts']} per MoE layer, top-{info['top_k']}"
         + (f", {info['n_group']} routing groups" if info["n_group"] > 1 else "")),
        ("shared experts", ", ".join(info["shared_experts"]) or "none"),
        ("parameters", f"{p['total']:,} ({info['dtype']})"),
        ("  in routed experts", f"{p['routed_experts']:,} ({100 * p['routed_experts'] / p['total']:.1f}%)"),
        *([("  in novice vectors", f"{p['novices']:,}")] if p.get("novices") else []),
        ("  everything else", f"{p['other']:,}"),
        *([("bytes on disk (weights)", f"{info['bytes_on_disk']:,}")] if info.get("bytes_on_disk") else []),
        *([("novices (MoNE)", (f"{info['novices']['experts_kept']} experts + "
                               f"{max(info['novices']['novices_per_layer'].values())} novices per MoE layer behind "
                               f"{info['novices']['router_experts']} router rows; load with moeprune.from_pretrained"))]
          if info.get("novices") else []),
        ("pruning keeps surviving routes exact", f"{info['pruning_keeps_surviving_routes_exact']}: "
                                                 f"{info['routing_note']}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


@app.command()
def methods():
    """List the registered methods with their paper references."""
    from moeprune.methods import METHODS

    t = Table(title="methods")
    t.add_column("name", no_wrap=True, min_width=max(map(len, METHODS)))
    for col in ("kind", "needs --calib", "what it does", "reference", "options"):
        t.add_column(col)
    for name, spec in sorted(METHODS.items()):
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(spec.config)) or "—"
        t.add_row(name, spec.kind, "yes" if spec.needs_calibration else "no", spec.summary, spec.paper, opts)
    out.print(t)


@app.command()
def observe(
    model: Annotated[str, typer.Argument(help="model directory")],
    calib: Annotated[str, typer.Option("--calib", help=".txt, directory, .jsonl, or hf:NAME[:CONFIG]:SPLIT")],
    out_dir: Annotated[str, typer.Option("--out", help="stats directory to write")],
    samples: int = 128, seq_len: int = 512, batch_size: int = 8, seed: int = 0,
    probe_size: Annotated[int, typer.Option(help="probe tokens kept per layer")] = 512,
    calib_field: Annotated[str | None, typer.Option(help="text field of a .jsonl calibration file")] = None,
    calib_template: CalibTemplate = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer directory if not the model's")] = None,
    device: Device = "cpu", force: Force = False, layerwise: Layerwise = None,
    offload_dir: OffloadDir = None, hidden_memory: HiddenMemory = 2.0,
):
    """Run the calibration pass once and save the statistics; many plans can use them.

    Runs under torchrun too (`torchrun --nproc-per-node P -m moeprune observe ...`): the batches are split
    between the processes, the statistics reduced exactly, and rank 0 writes them.
    """
    from moeprune.api import observe_checkpoint
    from moeprune.distributed import Ranks
    from moeprune.io import atomic_directory, check_output_dir

    check_output_dir(out_dir, force, inputs=(model,))
    ranks = Ranks.from_env(device)
    stats = observe_checkpoint(model, calib, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                               probe_size=probe_size, device=device, tokenizer=tokenizer, calib_field=calib_field,
                               calib_template=calib_template, ranks=ranks, layerwise=layerwise,
                               offload_dir=offload_dir, hidden_memory=hidden_memory, notify=err.print)
    if not ranks.is_main:
        return
    with atomic_directory(out_dir, force=force) as tmp:
        stats.save(tmp)
    out.print(f"stats of {len(stats.layers)} MoE layers over {stats.num_tokens:,} tokens written to {out_dir}")


@app.command()
def plan(
    stats: Annotated[str, typer.Argument(help="stats directory from `moeprune observe`")],
    method: Annotated[str, typer.Option("--method", help="see `moeprune methods`")],
    out_file: Annotated[str, typer.Option("--out", help="plan JSON to write")],
    ratio: Ratio = None, experts: Experts = None, option: Options = None, flatten_groups: Flatten = False,
    model: Annotated[str | None, typer.Option("--model", help="model directory, for methods that read "
                                                 "expert weights (see `moeprune methods`)")] = None,
    force: Force = False, layerwise: Layerwise = None,
):
    """Turn statistics into a plan (JSON) without changing the model."""
    from moeprune.api import make_plan_for, model_weights
    from moeprune.observe import Stats

    if Path(out_file).exists() and not force:
        raise MoepruneError(f"{out_file} already exists; pass --force to replace it")
    options = _parse_options(method, option)
    statistics = Stats.load(stats)
    weights = model_weights(model, layerwise, notify=err.print) if model is not None else None
    p = make_plan_for(statistics, method, ratio=ratio, experts=experts, flatten_groups=flatten_groups,
                      weights=weights, options=options)
    _write_atomically(out_file, p.save)
    _print_plan(p)
    out.print(f"plan written to {out_file}")


@app.command()
def apply(
    model: Annotated[str, typer.Argument(help="model directory")],
    plan_file: Annotated[str, typer.Argument(help="plan JSON from `moeprune plan`")],
    out_dir: Annotated[str, typer.Option("--out", help="output model directory")],
    stats: Annotated[str | None, typer.Option("--stats", help="stats directory the plan was made from "
                                                 "(needed by plans with novices, e.g. mone)")] = None,
    device: Device = "cpu", force: Force = False, layerwise: Layerwise = None,
):
    """Apply a plan to a model and write a stock transformers checkpoint (a MoNE checkpoint for novice plans)."""
    from moeprune.api import apply_checkpoint
    from moeprune.observe import Stats
    from moeprune.plan import Plan

    p = Plan.load(plan_file)
    loaded = Stats.load(stats) if stats else None
    path = apply_checkpoint(model, p, out_dir, force=force, device=device, command=_command_line(),
                            stats=loaded, layerwise=layerwise, notify=err.print)
    _print_done(p, path)


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="model directory")],
    method: Annotated[str, typer.Option("--method", help="see `moeprune methods`")],
    out_dir: Annotated[str, typer.Option("--out", help="output model directory")],
    ratio: Ratio = None, experts: Experts = None,
    calib: Annotated[str | None, typer.Option("--calib", help=".txt, directory, .jsonl, or hf:NAME[:CONFIG]:SPLIT")] = None,
    samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    batch_size: int = 8, seed: int = 0,
    probe_size: Annotated[int, typer.Option(help="probe tokens kept per layer")] = 512,
    calib_field: Annotated[str | None, typer.Option(help="text field of a .jsonl calibration file")] = None,
    calib_template: CalibTemplate = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer directory if not the model's")] = None,
    stats_out: Annotated[str | None, typer.Option("--save-stats", help="also keep the statistics here")] = None,
    option: Options = None, flatten_groups: Flatten = False, device: Device = "cpu", force: Force = False,
    layerwise: Layerwise = None,
    sequential: Annotated[bool, typer.Option(
        "--sequential", help="layer by layer, apply each layer's plan before its outputs feed the next layer, "
                             "so later statistics see the pruned model")] = False,
    offload_dir: OffloadDir = None, hidden_memory: HiddenMemory = 2.0,
):
    """Observe, plan, apply and save in one command.

    Runs under torchrun too (`torchrun --nproc-per-node P -m moeprune prune ...`): the calibration batches
    are split between the processes, the statistics reduced exactly, and rank 0 writes the checkpoint.
    """
    from moeprune.api import prune as prune_model
    from moeprune.distributed import Ranks
    from moeprune.plan import Plan

    options = _parse_options(method, option)
    path = prune_model(model, method, out_dir, ratio=ratio, experts=experts, calib=calib, samples=samples,
                       seq_len=seq_len, batch_size=batch_size, seed=seed, probe_size=probe_size, device=device,
                       flatten_groups=flatten_groups, force=force, tokenizer=tokenizer, calib_field=calib_field,
                       calib_template=calib_template, layerwise=layerwise, sequential=sequential,
                       offload_dir=offload_dir, hidden_memory=hidden_memory, command=_command_line(),
                       stats_out=stats_out, options=options,
                       notify=err.print)
    if Ranks.from_env(device).is_main:  # under torchrun only rank 0 writes
        _print_done(Plan.load(Path(path) / "moeprune_plan.json"), path)


@app.command("export-stock")
def export_stock(
    model: Annotated[str, typer.Argument(help="MoNE checkpoint directory (with novices)")],
    out_dir: Annotated[str, typer.Option("--out", help="output model directory")],
    force: Force = False,
):
    """Write the novice-free copy of a MoNE checkpoint (novices' router rows removed), for stock transformers."""
    from moeprune.novice import export_stock as export

    path = export(model, out_dir, force=force, command=_command_line())
    out.print(f"[bold green]stock checkpoint written to {path}[/] (loads with AutoModelForCausalLM.from_pretrained)")


@app.command("eval")
def evaluate(
    models: Annotated[list[str], typer.Argument(help="model directories; deltas are against the first")],
    text: Annotated[list[str] | None, typer.Option("--text", help="text file for perplexity (repeatable)")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma-separated lm-eval task names")] = None,
    task_dir: Annotated[str | None, typer.Option(
        "--task-dir", help="directory of local lm-eval task YAMLs; with --task-text, built tasks are kept here")] = None,
    task_text: Annotated[list[str] | None, typer.Option(
        "--task-text", help="DOMAIN=FILE.txt: build moeprune_DOMAIN_mc and _cloze from it (repeatable)")] = None,
    task_items: Annotated[int, typer.Option(help="items per task built by --task-text")] = 300,
    seed: Annotated[int, typer.Option(help="seed of the tasks built by --task-text")] = 0,
    json_out: Annotated[str | None, typer.Option("--json", help="also write the results as JSON here")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per perplexity window")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens of each text")] = None,
    limit: Annotated[int | None, typer.Option(help="first N items of each task")] = None,
    batch_size: int = 8,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer directory if not each model's")] = None,
    device: Device = "cpu", force: Force = False, layerwise: Layerwise = None,
):
    """Perplexity and zero-shot task scores of one or more checkpoints, side by side.

    Checkpoints larger than half the free memory (or all, with --layerwise) are scored for perplexity one
    decoder layer at a time; lm-eval tasks need the whole model.
    """
    from moeprune.evaluate import evaluate_models, parse_task_texts, render_table

    if json_out is not None and Path(json_out).exists() and not force:
        raise MoepruneError(f"{json_out} already exists; pass --force to replace it")
    if json_out is not None and not Path(json_out).resolve().parent.is_dir():
        raise MoepruneError(f"the directory of --json {json_out} does not exist")
    report = evaluate_models(
        models, text or [], [t.strip() for t in (tasks or "").split(",") if t.strip()], task_dir=task_dir,
        task_texts=parse_task_texts(task_text), task_items=task_items, task_seed=seed, seq_len=seq_len,
        max_tokens=max_tokens, batch_size=batch_size, limit=limit, device=device, tokenizer=tokenizer,
        progress=True, layerwise=layerwise, notify=err.print,
    )
    out.print(render_table(report))
    if json_out is not None:
        _write_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
        out.print(f"results written to {json_out}")


@app.command()
def analyze(
    source: Annotated[str, typer.Argument(help="model directory, or stats directory from `moeprune observe`")],
    out_dir: Annotated[str, typer.Option("--out", help="directory for the heatmaps (PNG) and matrices (JSON)")],
    model: Annotated[str | None, typer.Option("--model", help="with a stats SOURCE: the model to run the experts "
                                                 "(default: the one the stats were observed on)")] = None,
    stats: Annotated[str | None, typer.Option("--stats", help="with a model SOURCE: stats directory, for "
                                                 "--representation data")] = None,
    representation: Annotated[str | None, typer.Option(
        "--representation", help="data (outputs on probe tokens; needs stats), weight, flat or surrogate; "
                                 "default: data with stats, else weight")] = None,
    experts: Annotated[int | None, typer.Option("--experts", help="also find the groups DEK would merge "
                                                   "when keeping this many experts per layer")] = None,
    linkage: Annotated[str, typer.Option("--linkage", help="average, single or complete")] = "average",
    surrogate_tokens: Annotated[int, typer.Option(help="Gaussian input rows for --representation surrogate")] = 512,
    seed: Annotated[int, typer.Option(help="seed of the surrogate input")] = 0,
    flatten_groups: Flatten = False, force: Force = False,
):
    """Per MoE layer: the linear CKA similarity of the experts as heatmap PNG and JSON, and the groups for --experts."""
    from moeprune.analyze import analyze as run_analyze

    summary = run_analyze(source, out_dir, model=model, stats=stats, representation=representation,
                          experts=experts, linkage=linkage, surrogate_tokens=surrogate_tokens, seed=seed,
                          force=force, flatten_groups=flatten_groups)
    t = Table(title=f"linear CKA between experts ({summary['representation']})")
    for col in ("layer", "mean CKA", "most similar pair", *(["groups"] if experts is not None else [])):
        t.add_column(col)
    for i, f in summary["layers"].items():
        pair = f["most_similar_pair"]
        cells = [i, f"{f['mean_offdiagonal_cka']:.3f}", f"{pair[0]}, {pair[1]} ({f['max_offdiagonal_cka']:.3f})"]
        if experts is not None:
            cells.append(" ".join("+".join(map(str, g)) for g in f["groups"]))
        t.add_row(*cells)
    out.print(t)
    out.print(f"heatmaps and matrices written to {out_dir}")


@app.command()
def demo(
    method: Annotated[str | None, typer.Option(
        "--method", help="pruning method (see `moeprune methods`) [default: frequency, the benchmark's best]",
    )] = None,
    ratio: Annotated[float, typer.Option("--ratio", help="fraction of experts to remove per layer")] = 0.25,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="methods pruned side by side in one table, comma-separated: frequency,reap,mone",
    )] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="also write the report as JSON")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="prune and evaluate again")] = False,
):
    """Train (once, a few minutes) a small MoE offline, prune it, show quality before and after."""
    from moeprune.demo import DEFAULT_METHOD, next_steps, parse_methods, render_demo, run_demo

    if method is not None and compare is not None:
        raise MoepruneError("give --method or --compare, not both (--compare frequency,reap runs several)")
    methods = parse_methods(compare or method or DEFAULT_METHOD)
    if not 0 < ratio < 1:
        raise MoepruneError(f"--ratio must be between 0 and 1, e.g. 0.25 (got {ratio})")
    if json_out is not None and not Path(json_out).resolve().parent.is_dir():
        raise MoepruneError(f"the directory of --json {json_out} does not exist")
    try:
        report = run_demo(methods=methods, ratio=ratio, rebuild=rebuild,
                          say=lambda m: err.print(m, highlight=False, markup=False, soft_wrap=True))
    except KeyboardInterrupt:
        # What was done is kept (training checkpoints, finished checkpoints): say how to go on, and
        # exit as an interrupted command does, not with success.
        err.print("interrupted; run `moeprune demo` again to continue where it stopped", highlight=False)
        raise SystemExit(130)
    out.print(render_demo(report))
    for line in next_steps(report):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if json_out:
        _write_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
        out.print(f"report written to {json_out}")
    err.print(f"took {report['demo']['seconds']:.0f} s", highlight=False)


def _sweep_options(methods: list[str], pairs: list[str] | None) -> dict[str, dict]:
    """`-o KEY=VALUE` goes to every swept method with that option; `-o METHOD:KEY=VALUE` to one."""
    from moeprune.methods import get_method

    per: dict[str, list[str]] = {m: [] for m in methods}
    for pair in pairs or []:
        head, sep, _ = pair.partition("=")
        target, colon, key = head.rpartition(":")
        if colon:
            if target not in per:
                raise MoepruneError(f"bad --option {pair!r}: {target} is not a swept method ({', '.join(methods)})")
            per[target].append(pair[len(target) + 1:])
            continue
        takers = [m for m in methods if key.replace("-", "_") in {f.name for f in
                                                                  dataclasses.fields(get_method(m).config)}]
        if not sep or not takers:
            raise MoepruneError(f"bad --option {pair!r}: no swept method ({', '.join(methods)}) has an option "
                                f"{key!r}; see `moeprune methods`")
        for m in takers:
            per[m].append(pair)
    return {m: _parse_options(m, p) for m, p in per.items() if p}


@app.command()
def sweep(
    model: Annotated[str, typer.Argument(help="model directory")],
    method: Annotated[str, typer.Option("--method", help="method or comma-separated methods (see `moeprune methods`)")],
    out_dir: Annotated[str, typer.Option("--out", help="directory for sweep.json, sweep.md, sweep.png")],
    ratios: Annotated[str, typer.Option("--ratios", help="comma-separated fractions of experts to remove")] = (
        "0.125,0.25,0.375,0.5,0.625,0.75"),
    calib: Annotated[str | None, typer.Option("--calib", help=".txt, directory, .jsonl, or hf:NAME[:CONFIG]:SPLIT")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="text file for perplexity (repeatable)")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma-separated lm-eval task names")] = None,
    task_dir: Annotated[str | None, typer.Option("--task-dir", help="directory of local lm-eval task YAMLs")] = None,
    task_text: Annotated[list[str] | None, typer.Option(
        "--task-text", help="DOMAIN=FILE.txt: build moeprune_DOMAIN_mc and _cloze from it (repeatable)")] = None,
    task_items: Annotated[int, typer.Option(help="items per task built by --task-text")] = 300,
    limit: Annotated[int | None, typer.Option(help="first N items of each task")] = None,
    eval_seq_len: Annotated[int, typer.Option(help="tokens per perplexity window")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens of each text")] = None,
    knee_threshold: Annotated[float, typer.Option(
        help="quality falls off at the first ratio more than this much worse (ppl x(1+t), acc x(1-t))")] = 0.25,
    save_checkpoints: Annotated[bool, typer.Option("--save-checkpoints", help="also write every pruned "
                                                   "checkpoint under OUT/checkpoints/")] = False,
    samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    batch_size: int = 8, seed: int = 0,
    probe_size: Annotated[int, typer.Option(help="probe tokens kept per layer")] = 512,
    calib_field: Annotated[str | None, typer.Option(help="text field of a .jsonl calibration file")] = None,
    calib_template: CalibTemplate = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer directory if not the model's")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="KEY=VALUE for every swept method that has KEY, or METHOD:KEY=VALUE")] = None,
    flatten_groups: Flatten = False, device: Device = "cpu", force: Force = False,
):
    """Observe once, then prune at every ratio with every method and evaluate: where does quality fall off?"""
    from moeprune.evaluate import parse_task_texts
    from moeprune.sweep import knee_sentences, render_table
    from moeprune.sweep import sweep as run_sweep

    methods = [m.strip() for m in method.split(",") if m.strip()]
    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise MoepruneError(f"bad --ratios {ratios!r}: give comma-separated fractions, e.g. 0.125,0.25,0.5")
    result = run_sweep(
        model, methods, ratio_list, calib, out_dir, texts=text or [],
        tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()], task_dir=task_dir,
        task_texts=parse_task_texts(task_text), task_items=task_items, options=_sweep_options(methods, option),
        samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, probe_size=probe_size,
        calib_field=calib_field, calib_template=calib_template, tokenizer=tokenizer, device=device,
        flatten_groups=flatten_groups, eval_seq_len=eval_seq_len, max_tokens=max_tokens, limit=limit,
        knee_threshold=knee_threshold, save_checkpoints=save_checkpoints, force=force, command=_command_line(),
        log=lambda line: err.print(line, highlight=False),
    )
    out.print(render_table(result))
    for line in knee_sentences(result):
        out.print(line)
    out.print(f"sweep.json, sweep.md and sweep.png written to {out_dir}")


def _print_plan(p) -> None:
    t = Table(title=f"{p.method}: {p.num_experts_in} → {p.num_experts_out} experts per layer")
    novices = any(lp.novices for lp in p.layers)
    t.add_column("layer", justify="right")
    t.add_column("kept / merged")
    if novices:
        t.add_column("novices")
    t.add_column("removed")
    for lp in p.layers:
        cells = [str(lp.layer), " ".join("+".join(map(str, g.members)) for g in lp.groups)]
        cells += [" ".join(map(str, lp.novices)) or "—"] if novices else []
        t.add_row(*cells, " ".join(map(str, lp.dropped)) or "—")
    out.print(t)


def _print_done(p, path) -> None:
    _print_plan(p)
    card = (Path(path) / "README.md").read_text().split("## Parameters", 1)[1].split("## Experts", 1)[0]
    out.print(card.strip())
    if any(lp.novices for lp in p.layers):
        out.print(f"\n[bold green]MoNE checkpoint written to {path}[/] (load with moeprune.from_pretrained; "
                  "`moeprune export-stock` makes a stock copy)")
    else:
        out.print(f"\n[bold green]checkpoint written to {path}[/] (loads with AutoModelForCausalLM.from_pretrained)")


def main(argv: list[str] | None = None) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # oneDNN caches a primitive per matmul shape; MoE expert batches make new shapes at every layer, which
    # grew RSS by ~0.4 GiB over a 24-layer layer-by-layer pass with no measured speed gain
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    try:
        app(args=argv, standalone_mode=False)
    except MoepruneError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        return 130
    except Exception as e:  # click usage errors carry their own exit codes
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
