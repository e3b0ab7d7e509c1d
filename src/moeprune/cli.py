"""The `moeprune` command line: parses flags, calls the public API, prints tables.

Every failure the user can fix (a MoepruneError, a usage error, an OS error such as a full disk)
becomes one line on stderr and exit status 2; Ctrl-C and SIGTERM exit 130 and 143 with one line.
Nothing is written on failure. Results go to stdout, progress and notices to stderr. Heavy
libraries (torch, transformers) are imported inside the commands, so `--help` and `--version` are quick.
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
from rich.markup import escape
from rich.table import Table

from moeprune import MoepruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Mixture-of-Experts LLMs smaller without retraining.")
out = Console()
err = Console(stderr=True)

Ratio = Annotated[
    float | None, typer.Option("--ratio", help="fraction of routed experts to remove per layer")
]
Experts = Annotated[int | None, typer.Option("--experts", help="routed experts to keep per layer")]
Options = Annotated[
    list[str] | None, typer.Option("--option", "-o", help="method option KEY=VALUE (repeatable)")
]
Flatten = Annotated[
    bool,
    typer.Option("--flatten-groups", metavar="", help="route without expert groups (n_group=topk_group=1)"),
]
Force = Annotated[
    bool, typer.Option("--force", metavar="", help="replace an output directory moeprune wrote")
]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto")]
# the calibration options prune, observe and sweep share
Samples = Annotated[int, typer.Option(help="calibration sequences")]
SeqLen = Annotated[int, typer.Option(help="tokens per calibration sequence")]
ProbeSize = Annotated[int, typer.Option(help="probe tokens kept per layer")]
CalibField = Annotated[str | None, typer.Option(help="text field of a .jsonl calibration file")]
Tokenizer = Annotated[str | None, typer.Option(help="tokenizer directory if not the model's")]
Layerwise = Annotated[bool | None, typer.Option(
    "--layerwise/--in-memory", metavar="",
    help="read, prune and write one decoder layer at a time in bounded memory, or load the whole model "
         "(checked against free memory first) [default: layer by layer]")]
OffloadDir = Annotated[
    str | None,
    typer.Option(
        help="where hidden states beyond --hidden-memory go during layer-by-layer work "
        "[default: the temp directory]"
    ),
]
HiddenMemory = Annotated[
    float,
    typer.Option(
        help="GiB of calibration hidden states kept in memory between layers (layer by layer); "
        "the rest go to files"
    ),
]
CalibTemplate = Annotated[
    str | None,
    typer.Option(
        "--calib-template",
        help="build each .jsonl row's text from several fields, e.g. 'Q: {question} A: {answer}'",
    ),
]


def _command_line() -> str:
    return "moeprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_options(method: str, pairs: list[str] | None) -> dict:
    """KEY=VALUE strings -> typed keyword arguments of the method's config dataclass (which checks the
    values)."""
    import math

    from moeprune.api import get_method

    spec = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise MoepruneError(
                f"bad --option {pair!r}: method {method} has no option {key!r}; its options are "
                f"{', '.join(sorted(fields)) or 'none'}"
            )
        if not sep:
            raise MoepruneError(f"bad --option {pair!r}: give a value, as {key}=VALUE")
        kind = fields[key].type if isinstance(fields[key].type, type) else eval(str(fields[key].type))
        if kind is bool:
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise MoepruneError(
                    f"bad --option {pair!r}: {key} is true or false (also 1/0, yes/no, on/off)"
                )
            options[key] = value.lower() in TRUE_WORDS
            continue
        try:
            options[key] = kind(value)
        except ValueError:
            raise MoepruneError(f"bad --option {pair!r}: {key} must be a {kind.__name__}")
        if kind is float and not math.isfinite(options[key]):
            raise MoepruneError(f"bad --option {pair!r}: {key} must be a finite number")
    spec.default_config(**options)  # every method checks its option values when its config is built
    return options


def _version(value: bool) -> None:
    if value:
        from moeprune import __version__

        print(f"moeprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", metavar="", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = None,
):
    """Make Mixture-of-Experts LLMs smaller without retraining."""


def _quiet_libraries() -> None:
    """transformers' warnings and per-file progress bars are noise next to moeprune's own messages.

    Called by the commands that load models; the previous logging state comes back when the command
    ends (the click context closes its resources), so `main` called from Python leaves none behind.
    """
    from moeprune.api import quiet_transformers

    try:
        from typer._click.globals import get_current_context  # typer 0.29 vendors click
    except ImportError:  # older typer uses click itself
        from click import get_current_context
    get_current_context().with_resource(quiet_transformers(errors_only=True))


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="model directory")],
            as_json: Annotated[bool, typer.Option("--json", metavar="", help="print JSON")] = False):
    """Family, MoE layers, experts, top-k, shared experts, and where the parameters are."""
    from moeprune.api import inspect as inspect_model

    _quiet_libraries()
    info = inspect_model(model)
    if as_json:
        out.print_json(json.dumps(info))
        return
    t = Table(title=f"{model}", show_header=False)
    p = info["parameters"]
    rows = [
        ("family", f"{info['model_type']} ({info['architecture']})"),
        ("layers", f"{info['num_layers']}: MoE {info['moe_layers']}, dense {info['dense_layers'] or 'none'}"),
        (
            "routed experts",
            f"{info['num_experts']} per MoE layer, top-{info['top_k']}"
            + (f", {info['n_group']} routing groups" if info["n_group"] > 1 else ""),
        ),
        ("shared experts", ", ".join(info["shared_experts"]) or "none"),
        ("parameters", f"{p['total']:,} ({info['dtype']})"),
        ("  in routed experts", f"{p['routed_experts']:,} ({100 * p['routed_experts'] / p['total']:.1f}%)"),
        *([("  in novices" if (info.get("novices") or {}).get("novice_rank") else "  in novice vectors",
            f"{p['novices']:,}")] if p.get("novices") else []),
        ("  everything else", f"{p['other']:,}"),
        *([("bytes on disk (weights)", f"{info['bytes_on_disk']:,}")] if info.get("bytes_on_disk") else []),
        *(
            [
                (
                    "novices (MoNE)",
                    (
                        f"{info['novices']['experts_kept']} experts + "
                        f"{max(info['novices']['novices_per_layer'].values())} novices per MoE layer behind "
                        f"{info['novices']['router_experts']} router rows"
                        + _low_rank_words(info["novices"])
                        + "; load with moeprune.from_pretrained"
                    ),
                )
            ]
            if info.get("novices")
            else []
        ),
        (
            "pruning keeps surviving routes exact",
            f"{info['pruning_keeps_surviving_routes_exact']}: {info['routing_note']}",
        ),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


def _low_rank_words(novices: dict) -> str:
    """', low-rank (...) in layers [...]' for `inspect` when the novices are low-rank, else ''."""
    ranks = novices.get("novice_rank")
    if not ranks:
        return ""
    return f", low-rank (b + U Vᵀx, rank {sorted(set(ranks.values()))}) in layers {sorted(ranks)}"


@app.command()
def methods():
    """List the registered methods: what each does, its paper, whether it needs --calib, and its options."""
    from moeprune.api import METHODS

    _quiet_libraries()
    for name, spec in sorted(METHODS.items()):
        cfg = spec.default_config()
        reason = cfg.calibration_reason() if hasattr(cfg, "calibration_reason") else None
        calib = (
            "yes" if spec.needs_calibration else (f"with its default options ({reason})" if reason else "no")
        )
        out.print(f"[bold]{name}[/]  [dim]{spec.kind}[/]", highlight=False)
        out.print(f"  {escape(spec.summary)}", highlight=False)
        out.print(f"  paper: {escape(spec.paper)}", highlight=False)
        out.print(f"  needs --calib: {escape(calib)}", highlight=False)
        fields = dataclasses.fields(spec.config)
        if fields:
            out.print("  options (-o KEY=VALUE): " + ", ".join(f"{f.name}={f.default}" for f in fields),
                      highlight=False)
        out.print()


@app.command()
def observe(
    model: Annotated[str, typer.Argument(help="model directory")],
    calib: Annotated[str, typer.Option("--calib", help=".txt, directory, .jsonl, or hf:NAME[:CONFIG]:SPLIT")],
    out_dir: Annotated[str, typer.Option("--out", help="stats directory to write")],
    samples: int = 128, seq_len: int = 512, batch_size: int = 8, seed: int = 0,
    probe_size: ProbeSize = 512,
    calib_field: CalibField = None,
    calib_template: CalibTemplate = None,
    tokenizer: Tokenizer = None,
    device: Device = "cpu", force: Force = False, layerwise: Layerwise = None,
    offload_dir: OffloadDir = None, hidden_memory: HiddenMemory = 2.0,
):
    """Run the calibration pass once and save the statistics; many plans can use them.

    Runs under torchrun too (`torchrun --nproc-per-node P -m moeprune observe ...`): the batches are split
    between the processes, the statistics reduced exactly, and rank 0 writes them.
    """
    from moeprune.api import Ranks, check_output_dir, check_separate, observe_checkpoint, write_stats

    _quiet_libraries()
    inputs = {"model": model, "--calib": calib, "--tokenizer": tokenizer}
    check_separate(inputs, {"--out": out_dir, "--offload-dir": offload_dir})
    check_output_dir(out_dir, force, inputs, notify=err.print)
    ranks = Ranks.from_env(device)
    stats = observe_checkpoint(
        model, calib, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
        probe_size=probe_size, device=device, tokenizer=tokenizer, calib_field=calib_field,
        calib_template=calib_template, ranks=ranks, layerwise=layerwise, offload_dir=offload_dir,
        hidden_memory=hidden_memory, notify=err.print,
    )
    if not ranks.is_main:
        return
    write_stats(stats, out_dir, force=force)
    out.print(
        f"stats of {len(stats.layers)} MoE layers over {stats.num_tokens:,} tokens written to {out_dir}"
    )


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
    from moeprune.api import Stats, check_output_file, make_plan_for, model_weights, write_plan

    _quiet_libraries()
    check_output_file(out_file, force, {"stats": stats, "--model": model})
    options = _parse_options(method, option)
    statistics = Stats.load(stats)
    weights = (
        model_weights(model, layerwise, notify=err.print, stats=statistics) if model is not None else None
    )
    p = make_plan_for(statistics, method, ratio=ratio, experts=experts, flatten_groups=flatten_groups,
                      weights=weights, options=options)
    write_plan(p, out_file)
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
    """Apply a plan to a model and write a stock transformers checkpoint (a MoNE checkpoint for novice
    plans)."""
    from moeprune.api import Plan, Stats, apply_checkpoint, check_separate

    _quiet_libraries()
    inputs = {"model": model, "plan": plan_file, "--stats": stats}
    check_separate(inputs, {"--out": out_dir})  # before reading anything: the cheapest check
    p = Plan.load(plan_file)
    loaded = Stats.load(stats) if stats else None
    path = apply_checkpoint(model, p, out_dir, force=force, device=device, command=_command_line(),
                            stats=loaded, layerwise=layerwise, notify=err.print, input_paths=inputs)
    _print_done(p, path)


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="model directory")],
    method: Annotated[str, typer.Option("--method", help="see `moeprune methods`")],
    out_dir: Annotated[str, typer.Option("--out", help="output model directory")],
    ratio: Ratio = None,
    experts: Experts = None,
    calib: Annotated[
        str | None, typer.Option("--calib", help=".txt, directory, .jsonl, or hf:NAME[:CONFIG]:SPLIT")
    ] = None,
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    batch_size: int = 8,
    seed: int = 0,
    probe_size: ProbeSize = 512,
    calib_field: CalibField = None,
    calib_template: CalibTemplate = None,
    tokenizer: Tokenizer = None,
    stats_out: Annotated[
        str | None, typer.Option("--save-stats", help="also keep the statistics here")
    ] = None,
    option: Options = None,
    flatten_groups: Flatten = False,
    device: Device = "cpu",
    force: Force = False,
    layerwise: Layerwise = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            metavar="",
            help="layer by layer, apply each layer's plan before its outputs feed the next layer, "
            "so later statistics see the pruned model",
        ),
    ] = False,
    offload_dir: OffloadDir = None,
    hidden_memory: HiddenMemory = 2.0,
    compensate: Annotated[
        str,
        typer.Option(
            "--compensate",
            help="after each layer's surgery, fit it to the original layer's output on the calibration "
            "tokens in closed form (ridge), sequentially: auto (the default: down wherever it can run, none "
            "elsewhere, and it says which), none, down (the kept experts' down projections; "
            "a stock checkpoint), novices (MoNE's novice vectors), down+novices, lowrank (MoNE's novices "
            "become b + U Vᵀx of rank --compensate-rank, reduced-rank ridge), down+lowrank, router (the kept "
            "router rows, one linearised ridge step; softmax routers without group limits), "
            "router+down. A fit that "
            "does not lower the error on held-out calibration tokens is not applied; the plan's notes say "
            "which were",
        ),
    ] = "auto",
    compensate_rank: Annotated[
        int,
        typer.Option(
            "--compensate-rank",
            help="rank r of the low-rank novices of --compensate lowrank / down+lowrank (each novice holds "
            "H + 2·H·r parameters)",
        ),
    ] = 8,
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            help="uniform: every MoE layer keeps the same count; global: the same total, spread over the "
            "layers by each layer's measured output error on the probe (needs --calib; written in "
            "moeprune's own format: load it with moeprune.from_pretrained, stock transformers refuses it)",
        ),
    ] = "uniform",
    budget_floor: Annotated[
        int | None,
        typer.Option("--budget-floor", help="with --budget global, the fewest experts any layer keeps "
                     "(default: max(top-k, a quarter of the experts))"),
    ] = None,
):
    """Observe, plan, apply and save in one command.

    Runs under torchrun too (`torchrun --nproc-per-node P -m moeprune prune ...`): the calibration batches
    are split between the processes, the statistics reduced exactly, and rank 0 writes the checkpoint.
    """
    from moeprune.api import Plan, Ranks
    from moeprune.api import prune as prune_model

    _quiet_libraries()
    options = _parse_options(method, option)
    path = prune_model(
        model, method, out_dir, ratio=ratio, experts=experts, calib=calib, samples=samples, seq_len=seq_len,
        batch_size=batch_size, seed=seed, probe_size=probe_size, device=device, flatten_groups=flatten_groups,
        force=force, tokenizer=tokenizer, calib_field=calib_field, calib_template=calib_template,
        layerwise=layerwise, sequential=sequential, offload_dir=offload_dir, hidden_memory=hidden_memory,
        command=_command_line(), stats_out=stats_out, options=options, notify=err.print,
        compensate=compensate, compensate_rank=compensate_rank, budget=budget, budget_floor=budget_floor,
    )
    if Ranks.from_env(device).is_main:  # under torchrun only rank 0 writes
        _print_done(Plan.load(Path(path) / "moeprune_plan.json"), path)


@app.command("export-stock")
def export_stock(
    model: Annotated[str, typer.Argument(help="MoNE checkpoint directory (with novices)")],
    out_dir: Annotated[str, typer.Option("--out", help="output model directory")],
    force: Force = False,
    flatten_groups: Annotated[bool, typer.Option(
        "--flatten-groups", metavar="",
        help="route without expert groups where the kept experts do not fit the routing groups",
    )] = False,
):
    """Write the novice-free copy of a MoNE checkpoint (novices' router rows removed), for stock
    transformers."""
    from moeprune.api import export_stock as export
    from moeprune.api import loader_name

    _quiet_libraries()
    path = export(model, out_dir, force=force, command=_command_line(), flatten_groups=flatten_groups)
    out.print(
        f"[bold green]stock checkpoint written to {path}[/] (loads with {loader_name(path)}.from_pretrained)"
    )


@app.command("eval")
def evaluate(
    models: Annotated[list[str], typer.Argument(help="model directories; deltas are against the first")],
    text: Annotated[
        list[str] | None, typer.Option("--text", help="text file for perplexity (repeatable)")
    ] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma-separated lm-eval task names")] = None,
    task_dir: Annotated[
        str | None,
        typer.Option(
            "--task-dir",
            help="directory of local lm-eval task YAMLs; with --task-text, built tasks are kept here",
        ),
    ] = None,
    task_text: Annotated[
        list[str] | None,
        typer.Option(
            "--task-text", help="DOMAIN=FILE.txt: build moeprune_DOMAIN_mc and _cloze from it (repeatable)"
        ),
    ] = None,
    task_items: Annotated[int, typer.Option(help="items per task built by --task-text")] = 300,
    seed: Annotated[int, typer.Option(help="seed of the tasks built by --task-text")] = 0,
    json_out: Annotated[
        str | None, typer.Option("--json", help="also write the results as JSON here")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per perplexity window")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens of each text")] = None,
    limit: Annotated[int | None, typer.Option(help="first N items of each task")] = None,
    batch_size: int = 8,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer directory if not each model's")] = None,
    device: Device = "cpu",
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="replace an existing --json file moeprune wrote")
    ] = False,
    layerwise: Annotated[
        bool | None,
        typer.Option(
            "--layerwise/--in-memory",
            metavar="",
            help="score perplexity one decoder layer at a time in bounded memory, or load the whole model "
            "[default: layer by layer; lm-eval tasks and MoNE checkpoints load whole]",
        ),
    ] = None,
):
    """Perplexity and zero-shot task scores of one or more checkpoints, side by side.

    Perplexity is scored one decoder layer at a time (unless --in-memory); lm-eval tasks need the whole
    model, which is loaded after its peak is checked against the free memory.
    """
    from moeprune.api import (
        check_output_file,
        check_settings,
        evaluate_models,
        parse_task_texts,
        write_file_atomically,
    )
    from moeprune.api import render_report as render_table

    _quiet_libraries()
    check_settings(task_items=task_items, seed=seed, seq_len=seq_len, max_tokens=max_tokens, limit=limit,
                   batch_size=batch_size)
    if json_out is not None:
        inputs = {f"model {i + 1}": m for i, m in enumerate(models)}
        inputs.update({f"--text {t}": t for t in text or []}, **{"--tokenizer": tokenizer})
        check_output_file(json_out, force, inputs, what="--json")
    report = evaluate_models(
        models, text or [], [t.strip() for t in (tasks or "").split(",") if t.strip()], task_dir=task_dir,
        task_texts=parse_task_texts(task_text), task_items=task_items, task_seed=seed, seq_len=seq_len,
        max_tokens=max_tokens, batch_size=batch_size, limit=limit, device=device, tokenizer=tokenizer,
        progress=True, layerwise=layerwise, notify=err.print,
    )
    out.print(render_table(report))
    if json_out is not None:
        from moeprune import __version__

        record = {"written_by": f"moeprune {__version__}", **report}
        write_file_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        out.print(f"results written to {json_out}")


@app.command()
def analyze(
    source: Annotated[
        str, typer.Argument(help="model directory, or stats directory from `moeprune observe`")
    ],
    out_dir: Annotated[
        str, typer.Option("--out", help="directory for the heatmaps (PNG) and matrices (JSON)")
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="with a stats SOURCE: the model to run the experts "
            "(default: the one the stats were observed on)",
        ),
    ] = None,
    stats: Annotated[
        str | None,
        typer.Option("--stats", help="with a model SOURCE: stats directory, for --representation data"),
    ] = None,
    representation: Annotated[
        str | None,
        typer.Option(
            "--representation",
            help="data (outputs on probe tokens; needs stats), weight, flat or surrogate; "
            "default: data with stats, else weight",
        ),
    ] = None,
    experts: Annotated[
        int | None,
        typer.Option(
            "--experts", help="also find the groups DEK would merge when keeping this many experts per layer"
        ),
    ] = None,
    linkage: Annotated[str, typer.Option("--linkage", help="average, single or complete")] = "average",
    surrogate_tokens: Annotated[
        int, typer.Option(help="Gaussian input rows for --representation surrogate")
    ] = 512,
    seed: Annotated[int, typer.Option(help="seed of the surrogate input")] = 0,
    flatten_groups: Flatten = False,
    force: Force = False,
):
    """Per MoE layer: the linear CKA similarity of the experts as heatmap PNG and JSON, and the groups for
    --experts."""
    from moeprune.api import analyze as run_analyze

    _quiet_libraries()
    summary = run_analyze(source, out_dir, model=model, stats=stats, representation=representation,
                          experts=experts, linkage=linkage, surrogate_tokens=surrogate_tokens, seed=seed,
                          force=force, flatten_groups=flatten_groups)
    t = Table(title=f"linear CKA between experts ({summary['representation']})")
    for col in ("layer", "mean CKA", "most similar pair", *(["groups"] if experts is not None else [])):
        t.add_column(col)
    for i, f in summary["layers"].items():
        pair = f["most_similar_pair"]
        cells = [
            i,
            f"{f['mean_offdiagonal_cka']:.3f}",
            f"{pair[0]}, {pair[1]} ({f['max_offdiagonal_cka']:.3f})",
        ]
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
    if json_out is not None:
        from moeprune.api import check_output_file

        check_output_file(json_out, False, what="--json")
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
        from moeprune import __version__
        from moeprune.api import write_file_atomically

        record = {"written_by": f"moeprune {__version__}", **report}
        write_file_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        out.print(f"report written to {json_out}")
    err.print(f"took {report['demo']['seconds']:.0f} s", highlight=False)


def _sweep_options(methods: list[str], pairs: list[str] | None) -> dict[str, dict]:
    """`-o KEY=VALUE` goes to every swept method with that option; `-o METHOD:KEY=VALUE` to one."""
    from moeprune.api import get_method

    per: dict[str, list[str]] = {m: [] for m in methods}
    for pair in pairs or []:
        head, sep, _ = pair.partition("=")
        target, colon, key = head.rpartition(":")
        if colon:
            if target not in per:
                raise MoepruneError(
                    f"bad --option {pair!r}: {target} is not a swept method ({', '.join(methods)})"
                )
            per[target].append(pair[len(target) + 1:])
            continue
        takers = [m for m in methods if key.replace("-", "_") in {f.name for f in
                                                                  dataclasses.fields(get_method(m).config)}]
        if not sep or not takers:
            raise MoepruneError(
                f"bad --option {pair!r}: no swept method ({', '.join(methods)}) has an option "
                f"{key!r}; see `moeprune methods`"
            )
        for m in takers:
            per[m].append(pair)
    return {m: _parse_options(m, p) for m, p in per.items() if p}


@app.command()
def sweep(
    model: Annotated[str, typer.Argument(help="model directory")],
    method: Annotated[
        str, typer.Option("--method", help="method or comma-separated methods (see `moeprune methods`)")
    ],
    out_dir: Annotated[str, typer.Option("--out", help="directory for sweep.json, sweep.md, sweep.png")],
    ratios: Annotated[
        str, typer.Option("--ratios", help="comma-separated fractions of experts to remove")
    ] = ("0.125,0.25,0.375,0.5,0.625,0.75"),
    calib: Annotated[
        str | None, typer.Option("--calib", help=".txt, directory, .jsonl, or hf:NAME[:CONFIG]:SPLIT")
    ] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="text file for perplexity (repeatable)")
    ] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma-separated lm-eval task names")] = None,
    task_dir: Annotated[
        str | None, typer.Option("--task-dir", help="directory of local lm-eval task YAMLs")
    ] = None,
    task_text: Annotated[
        list[str] | None,
        typer.Option(
            "--task-text", help="DOMAIN=FILE.txt: build moeprune_DOMAIN_mc and _cloze from it (repeatable)"
        ),
    ] = None,
    task_items: Annotated[int, typer.Option(help="items per task built by --task-text")] = 300,
    limit: Annotated[int | None, typer.Option(help="first N items of each task")] = None,
    eval_seq_len: Annotated[int, typer.Option(help="tokens per perplexity window")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens of each text")] = None,
    knee_threshold: Annotated[
        float,
        typer.Option(
            help="quality falls off at the first ratio more than this much worse (ppl x(1+t), acc x(1-t))"
        ),
    ] = 0.25,
    save_checkpoints: Annotated[
        bool,
        typer.Option(
            "--save-checkpoints", metavar="", help="also write every pruned checkpoint under OUT/checkpoints/"
        ),
    ] = False,
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    batch_size: int = 8,
    seed: int = 0,
    probe_size: ProbeSize = 512,
    calib_field: CalibField = None,
    calib_template: CalibTemplate = None,
    tokenizer: Tokenizer = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", help="KEY=VALUE for every swept method that has KEY, or METHOD:KEY=VALUE"
        ),
    ] = None,
    flatten_groups: Flatten = False,
    device: Device = "cpu",
    force: Force = False,
    layerwise: Layerwise = None,
):
    """Observe once, then prune at every ratio with every method and evaluate: where does quality fall off?"""
    from moeprune.api import knee_sentences, parse_task_texts
    from moeprune.api import render_sweep as render_table
    from moeprune.api import sweep as run_sweep

    _quiet_libraries()
    methods = [m.strip() for m in method.split(",") if m.strip()]
    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise MoepruneError(f"bad --ratios {ratios!r}: give comma-separated fractions, e.g. 0.125,0.25,0.5")
    result = run_sweep(
        model,
        methods,
        ratio_list,
        calib,
        out_dir,
        texts=text or [],
        tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()],
        task_dir=task_dir,
        task_texts=parse_task_texts(task_text),
        task_items=task_items,
        options=_sweep_options(methods, option),
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        probe_size=probe_size,
        calib_field=calib_field,
        calib_template=calib_template,
        tokenizer=tokenizer,
        device=device,
        flatten_groups=flatten_groups,
        eval_seq_len=eval_seq_len,
        max_tokens=max_tokens,
        limit=limit,
        knee_threshold=knee_threshold,
        save_checkpoints=save_checkpoints,
        force=force,
        command=_command_line(),
        log=lambda line: err.print(line, highlight=False),
        layerwise=layerwise,
    )
    out.print(render_table(result))
    for line in knee_sentences(result):
        out.print(line)
    out.print(f"sweep.json, sweep.md and sweep.png written to {out_dir}")


def _print_plan(p) -> None:
    counts = "per-layer counts" if p.per_layer_counts else f"{p.num_experts_out} experts per layer"
    t = Table(title=f"{p.method}: {p.num_experts_in} → {counts}")
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
    from moeprune.api import loader_name

    _print_plan(p)
    card = (Path(path) / "README.md").read_text().split("## Parameters", 1)[1].split("## Experts", 1)[0]
    out.print(card.strip())
    if any(lp.novices for lp in p.layers):
        out.print(f"\n[bold green]MoNE checkpoint written to {path}[/] (load with moeprune.from_pretrained; "
                  "`moeprune export-stock` makes a stock copy)")
    elif p.per_layer_counts:
        out.print(f"\n[bold green]checkpoint with per-layer expert counts written to {path}[/] (load with "
                  "moeprune.from_pretrained; stock transformers cannot describe it)")
    else:
        out.print(
            f"\n[bold green]checkpoint written to {path}[/] (loads with {loader_name(path)}.from_pretrained)"
        )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 only when the command did what it was asked)."""
    try:
        from typer import _click  # typer 0.29 raises the exceptions of its own vendored click
    except ImportError:  # older typer raises click's
        import click as _click

    from moeprune import Terminated, signals_as_exceptions

    try:
        with signals_as_exceptions():
            status = app(args=argv, prog_name="moeprune", standalone_mode=False)
    except MoepruneError as e:
        err.print(f"[bold red]error:[/] {escape(_one_line(e))}", highlight=False, soft_wrap=True)
        return 2
    except Terminated:
        err.print("error: terminated (SIGTERM); nothing was written", highlight=False)
        return 143
    except KeyboardInterrupt:
        err.print("error: interrupted; nothing was written", highlight=False)
        return 130
    except _click.exceptions.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "moeprune"
        err.print(
            f"error: {_one_line(e.format_message())} (see `{where} --help`)", highlight=False, markup=False,
            soft_wrap=True,
        )
        return 2
    except _click.exceptions.ClickException as e:
        err.print(f"error: {_one_line(e.format_message())}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err.print("error: aborted; nothing was written", highlight=False)
        return 1
    except OSError as e:  # a full disk, a vanished directory, a permission changed mid-run
        where = f": {e.filename}" if e.filename else ""
        err.print(f"error: {e.strerror or e}{where}; nothing was written", highlight=False, markup=False,
                  soft_wrap=True)
        return 2
    if status == 130:  # typer turns Ctrl-C into a return value, after the clean-ups ran
        err.print("error: interrupted; nothing was written", highlight=False)
    return status if isinstance(status, int) else 0


def run() -> int:
    """The `moeprune` command: `main` in a process of its own, tuned for large layer-by-layer work.

    These settings are process-wide and cannot all be undone, so they are made here, where the
    process is moeprune's, and never by `main` (which tests and scripts call in their own process).
    """
    from moeprune import return_freed_memory_to_the_system

    # oneDNN caches a primitive per matmul shape; MoE expert batches make new shapes at every layer, which
    # grew RSS by ~0.4 GiB over a 24-layer layer-by-layer pass with no measured speed gain
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    # a fixed mmap threshold keeps freed layers out of RSS, but turns every MiB-sized tensor the demo's
    # training allocates per step into an mmap/munmap: 10-20% slower training (measured side by side)
    if sys.argv[1:2] != ["demo"]:
        return_freed_memory_to_the_system()
    return main()


if __name__ == "__main__":
    sys.exit(run())
