"""Quality benchmark: every registered method at several ratios on both trained testbeds.

For each testbed model (`mixtral-8e`: 8 experts top-2; `qwen-fine`: fine-grained with a shared
expert), calibrate once on the mixed training split, then for every method variant and ratio plan,
apply to an in-memory copy and evaluate on the held-out *test* split: perplexity per domain (prose,
code) and the testbed's zero-shot tasks (4-way continuation choice and last-word cloze, per
domain). Parameter counts come from the pruned model itself. A second, task-specific run
calibrates on code only (UNCURL's setting) and evaluates on both domains.

Rows are appended to `results/quality_rows.jsonl` as they finish, so an interrupted run resumes
where it stopped; `results/quality.md` and `results/quality.json` are rewritten from all rows.

    python benchmarks/quality.py                       # everything (about an hour on 2 cores)
    python benchmarks/quality.py --models mixtral-8e --ratios 0.25,0.5 --variants reap,mone
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# (label, method, options): every registered method, plus the variants the papers name.
VARIANTS = [
    ("random", "random", {}),
    ("frequency", "frequency", {}),
    ("routing_score", "routing_score", {}),
    ("ean", "ean", {}),
    ("reap", "reap", {}),
    ("mone", "mone", {}),
    ("mone-no-novice", "mone", {"novice": False}),
    # MoNE's kept set as a stock checkpoint: router rows sliced, the survivors renormalised (the lead)
    ("mone-stock", "mone", {}),
    ("naee", "naee", {}),
    ("dek-data", "dek", {"representation": "data"}),
    ("dek-data-learned", "dek", {"representation": "data", "coefficients": "learned"}),
    ("dek-weight", "dek", {"representation": "weight"}),
    ("dek-weight-learned", "dek", {"representation": "weight", "coefficients": "learned"}),
    ("hc_smoe", "hc_smoe", {}),
    ("msmoe", "msmoe", {}),
    ("uncurl", "uncurl", {}),
    ("dek-data-aligned", "dek", {"representation": "data", "align": True}),
    ("dek-weight-aligned", "dek", {"representation": "weight", "align": True}),
    ("dek-data-learned-aligned", "dek", {"representation": "data", "coefficients": "learned", "align": True}),
    ("hc_smoe-aligned", "hc_smoe", {"align": True}),
    ("ream", "ream", {}),
    ("ream-code", "ream",
     {"saliency": "reap_squared", "output_similarity": "mean", "logit_similarity": "distance"}),
]
STOCK_OF = {"mone-stock"}  # variants whose plan is written without its novices (plain pruning)
TASK_SPECIFIC = ["frequency", "reap", "naee", "msmoe", "uncurl"]

# (label, method, options, compensate, sequential): the whole `moeprune prune` path on the testbed checkpoint,
# written, reloaded and scored. Compensation fits each layer on the outputs of the compressed layers before
# it,
# so it walks the model once per row (sequentially); `-seq` rows are that walk without a fit, to tell the two
# effects apart.
PRUNED = [
    ("reap-seq", "reap", {}, "none", True),
    ("reap+down", "reap", {}, "down", True),
    # the kept router rows refitted (routers renormalised over the top-k only: mixtral-8e, not qwen-fine)
    ("reap+router", "reap", {}, "router", True),
    ("reap+router+down", "reap", {}, "router+down", True),
    ("ean+down", "ean", {}, "down", True),
    ("frequency+down", "frequency", {}, "down", True),
    ("naee+down", "naee", {}, "down", True),
    ("mone+novices", "mone", {}, "novices", True),
    ("mone+down+novices", "mone", {}, "down+novices", True),
    ("ream-seq", "ream", {}, "none", True),
    ("ream+down", "ream", {}, "down", True),
    ("hc_smoe+down", "hc_smoe", {}, "down", True),
    ("msmoe+down", "msmoe", {}, "down", True),
    ("auto+down", "auto", {}, "down", True),
    ("auto-novices+down+lowrank", "auto", {"format": "novices"}, "down+lowrank", True),
    ("mone+lowrank", "mone", {}, "lowrank", True),  # low-rank novices b + U Vᵀx, rank 8 (the default)
    ("mone+down+lowrank", "mone", {}, "down+lowrank", True),
    # an optional sixth field is the budget (`--budget global`: per-layer counts by measured damage, the same
    # total); its rows are written in moeprune's per-layer format and reloaded with moeprune.from_pretrained
    ("reap-global", "reap", {}, "none", False, "global"),
    ("ean-global", "ean", {}, "none", False, "global"),
    ("frequency-global", "frequency", {}, "none", False, "global"),
]
STOCK = "stock"  # output formats: a stock checkpoint, or moeprune's with novices
NOVICE = "moeprune (novices)"
PER_LAYER = "moeprune (per-layer counts)"


def evaluate(model, tok, texts: dict, suite, max_tokens: int) -> dict:
    from moeprune.evaluate import perplexity, run_tasks

    ppl = {d: perplexity(model, tok, p, seq_len=512, max_tokens=max_tokens, batch_size=8)["ppl"]
           for d, p in texts.items()}
    tasks = run_tasks(model, tok, suite, batch_size=16) if suite is not None else {}
    return {"ppl": ppl, "tasks": {name: m.get("acc") for name, m in tasks.items()}}


def weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def row_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def run_model(name: str, args, done: dict, sink) -> None:
    from moeprune.api import make_plan_for
    from moeprune.data import calibration_blocks
    from moeprune.evaluate import load_tasks, write_tasks
    from moeprune.observe import observe
    from moeprune.pipeline.access import ModelWeights
    from moeprune.plan import budget
    from moeprune.store.checkpoint import load_model, load_tokenizer, parameter_counts
    from moeprune.surgery import apply_plan
    from moeprune.testbed import build_corpus, get_testbed

    base_dir = get_testbed(name)
    corpus = build_corpus()
    texts = {"prose": corpus.path("prose", "test"), "code": corpus.path("code", "test")}
    model = load_model(base_dir)
    tok = load_tokenizer(base_dir)
    E, K = (
        model.config.to_dict().get("num_local_experts") or model.config.num_experts,
        model.config.num_experts_per_tok,
    )
    # the weights' digest too: a testbed retrained on another machine can differ in the last digits, which
    # moves every perplexity (rows of another training are not comparable)
    eval_settings = {"max_tokens": args.max_tokens, "task_items": args.task_items, "testbed": base_dir.name,
                     "weights": weights_digest(base_dir)}
    with tempfile.TemporaryDirectory(prefix="moeprune-quality-") as task_dir:
        names = write_tasks(texts, task_dir, n_items=args.task_items, seed=0)
        suite = load_tasks(names, task_dir)

        def emit(row):
            row.update(model=name, testbed=base_dir.name, num_experts=E, top_k=K)
            sink(row)
            q = " ".join(f"{d}={v:.2f}" for d, v in row["ppl"].items())
            print(f"[{name}] {row['calibration']:5s} {row['variant']:20s} r={row['ratio']:<6} {q} "
                  f"acc={mean_acc(row):.3f} ({row['seconds']:.0f}s)", flush=True)

        key = row_key(name, "baseline", eval_settings)
        if key not in done:
            t0 = time.perf_counter()
            r = evaluate(model, tok, texts, suite, args.max_tokens)
            emit({"key": key, "variant": "original", "method": None, "ratio": 0.0, "experts": E,
                  "calibration": "-", "parameters": parameter_counts(model), **r,
                  "seconds": time.perf_counter() - t0})
        weights = ModelWeights(model)
        observe_seconds: dict[str, float] = {}

        def timed_observe(calib_name):
            """(stats, seconds) of the observe pass on this calibration split (the unit plan costs are in)."""
            cal = calibration_blocks(tok, str(corpus.path(calib_name, "train")), samples=args.samples,
                                     seq_len=args.seq_len, seed=0)
            t0 = time.perf_counter()
            st = observe(model, cal.input_ids, batch_size=8, probe_size=512, seed=0,
                         calibration=cal.provenance, source=str(base_dir))
            return st, time.perf_counter() - t0

        # the whole-prune rows first: they answer the compensation question; the observe-once rows follow
        run_pruned(name, base_dir, corpus, tok, texts, suite, args, done, emit, eval_settings, E, K,
                   lambda: observe_seconds.get("mixed")
                   or observe_seconds.setdefault("mixed", timed_observe("mixed")[1]))
        for calib_name, variants in (
            ("mixed", in_order(VARIANTS, args.variant_order)),
            (
                "code",
                [
                    v
                    for v in VARIANTS
                    if v[0] in TASK_SPECIFIC and v[0] in args.variants and args.task_specific
                ],
            ),
        ):
            if not variants:
                continue
            stats = None
            # the task-specific run answers UNCURL's question at the two ratios only
            ratios = args.ratios if calib_name == "mixed" else [r for r in args.ratios if r in (0.25, 0.5)]
            for label, method, options in variants:
                for ratio in ratios:
                    keep = budget(E, K, ratio=ratio)
                    key = row_key(name, calib_name, label, keep, eval_settings, args.samples, args.seq_len)
                    if key in done:
                        continue
                    if stats is None:
                        stats, observe_seconds[calib_name] = timed_observe(calib_name)
                    t0 = time.perf_counter()
                    plan = make_plan_for(stats, method, experts=keep, weights=weights, options=options)
                    if label in STOCK_OF:
                        plan = as_stock(plan)
                    t_plan = time.perf_counter() - t0
                    pruned = apply_plan(copy.deepcopy(model), plan, stats=stats)
                    r = evaluate(pruned, tok, texts, suite, args.max_tokens)
                    emit({"key": key, "variant": label, "method": method, "options": options, "ratio": ratio,
                          "experts": keep, "calibration": calib_name, "parameters": parameter_counts(pruned),
                          "plan_seconds": t_plan, "observe_seconds": observe_seconds[calib_name],
                          "format": NOVICE if any(lp.novices for lp in plan.layers) else STOCK, **r,
                          "seconds": time.perf_counter() - t0})
                    del pruned
                    gc.collect()


def run_pruned(name, base_dir, corpus, tok, texts, suite, args, done, emit, eval_settings, E, K,
               observe_time) -> None:
    """The `PRUNED` rows: `moeprune prune` on the testbed checkpoint (calibrated on the mixed split, the
    same tokens as the observe-once rows), the output reloaded as a user would and scored."""
    import moeprune
    from moeprune.api import prune as prune_checkpoint
    from moeprune.errors import MoepruneError
    from moeprune.plan import Plan, budget
    from moeprune.store.checkpoint import load_model, parameter_counts

    for label, method, options, compensate, sequential, *spread in in_order(PRUNED, args.variant_order):
        spread = spread[0] if spread else "uniform"
        for ratio in args.ratios:
            keep = budget(E, K, ratio=ratio)
            key = row_key(name, "mixed", label, keep, eval_settings, args.samples, args.seq_len)
            if key in done:
                continue
            observe_seconds = observe_time()
            with tempfile.TemporaryDirectory(prefix="moeprune-quality-") as d:
                t0 = time.perf_counter()
                try:
                    out = prune_checkpoint(
                        base_dir, method, Path(d) / "out", experts=keep,
                        calib=str(corpus.path("mixed", "train")), samples=args.samples, seq_len=args.seq_len,
                        batch_size=8, seed=0, probe_size=512, progress=False, options=options,
                        sequential=sequential, compensate=compensate, budget=spread)
                except MoepruneError as e:  # a fit this family's routing does not allow: said, not scored
                    print(f"[{name}] {label} refused: {e}", flush=True)
                    break
                t_prune = time.perf_counter() - t0
                plan = Plan.load(out / "moeprune_plan.json")
                novice = any(lp.novices for lp in plan.layers)
                per_layer = plan.per_layer_counts
                pruned = moeprune.from_pretrained(out) if novice or per_layer else load_model(out)
                r = evaluate(pruned, tok, texts, suite, args.max_tokens)
                params = parameter_counts(pruned)
            fits = {lp.layer: lp.notes["compensation"] for lp in plan.layers
                    if "compensation" in lp.notes}
            emit({"key": key, "variant": label, "method": method, "options": options, "ratio": ratio,
                  "experts": keep, "calibration": "mixed", "parameters": params, "compensate": compensate,
                  "sequential": sequential, "format": NOVICE if novice else PER_LAYER if per_layer else STOCK,
                  "fits": fits, "budget": spread,
                  "experts_per_layer": {lp.layer: lp.num_experts_out for lp in plan.layers},
                  "prune_seconds": t_prune, "observe_seconds": observe_seconds, **r,
                  "seconds": time.perf_counter() - t0})
            del pruned
            gc.collect()


def as_stock(plan):
    """The plan with every novice dropped: what `export-stock` writes from a novice checkpoint."""
    import dataclasses

    return dataclasses.replace(plan, layers=[dataclasses.replace(lp, novices=[]) for lp in plan.layers])


def in_order(variants: list, names: list[str]) -> list:
    """The variants named in `names`, in that order (the order rows are run in)."""
    return [v for name in names for v in variants if v[0] == name]


def mean_acc(row) -> float:
    accs = [v for v in row["tasks"].values() if v is not None]
    return sum(accs) / len(accs) if accs else float("nan")


def settings_text(samples: int, seq_len: int, max_tokens: int, task_items: int) -> str:
    """The settings every number depends on, with the CLI flags that reproduce them."""
    return (f"Settings: calibration {samples} × {seq_len} tokens, seed 0 (with the CLI: "
            f"`--samples {samples} --seq-len {seq_len}`; its default 128 × 512 gives other numbers); "
            f"perplexity on the first {max_tokens:,} test tokens of each domain in 512-token windows "
            f"(`--max-tokens {max_tokens} --seq-len 512`); tasks of {task_items} items "
            f"(`--task-items {task_items}`).")


def render(rows: list[dict], settings: str = "") -> str:
    """Markdown: per model and calibration, one table per ratio, every variant against the original."""
    out = ["# Quality benchmark", "",
           "Perplexity on the held-out test split (first tokens of each domain, 512-token windows) and "
           "accuracy (%) on the testbed's tasks; `Δ` columns are against the unpruned model. "
           "Generated by `benchmarks/quality.py`.", "", *([settings, ""] if settings else [])]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        base = next((r for r in mrows if r["variant"] == "original"), None)
        if base is None:
            continue
        task_names = sorted(base["tasks"])
        out += [f"## {model} ({base['num_experts']} experts, top-{base['top_k']}, "
                f"{base['parameters']['total'] / 1e6:.2f}M parameters)", ""]
        for calib in dict.fromkeys(r["calibration"] for r in mrows if r["calibration"] != "-"):
            for ratio in sorted({r["ratio"] for r in mrows if r["calibration"] == calib}):
                sel = [r for r in mrows if r["calibration"] == calib and r["ratio"] == ratio]
                keep = sel[0]["experts"]
                out += [
                    f"### {model}, calibrated on {calib}, ratio {ratio} ({base['num_experts']}→{keep} "
                    "experts)",
                    "",
                    "| variant | params | ppl prose | Δ | ppl code | Δ | "
                    + " | ".join(t.replace("moeprune_", "") for t in task_names)
                    + " | mean acc |",
                    "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(task_names) + 1),
                ]
                for r in [base] + sorted(sel, key=lambda r: geo_ppl(r, base)):
                    cells = [r["variant"], f"{r['parameters']['total'] / 1e6:.2f}M"]
                    for d in ("prose", "code"):
                        cells += [
                            f"{r['ppl'][d]:.1f}",
                            "" if r is base else f"{100 * (r['ppl'][d] / base['ppl'][d] - 1):+.1f}%",
                        ]
                    cells += [
                        f"{100 * r['tasks'][t]:.1f}" if r["tasks"].get(t) is not None else "—"
                        for t in task_names
                    ]
                    cells.append(f"{100 * mean_acc(r):.1f}")
                    out.append("| " + " | ".join(cells) + " |")
                out.append("")
    return "\n".join(out)


def geo_ppl(r, base) -> float:
    logs = [math.log(r["ppl"][d] / base["ppl"][d]) for d in base["ppl"]]
    return math.exp(sum(logs) / len(logs))


def summary(rows: list[dict]) -> str:
    """One compact table per model: geometric-mean perplexity ratio (mean acc) per variant and ratio."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model and r["calibration"] == "mixed"]
        base = next((r for r in rows if r["model"] == model and r["variant"] == "original"), None)
        if base is None or not mrows:
            continue
        ratios = sorted({r["ratio"] for r in mrows})
        out += [f"**{model}** — perplexity relative to the original (geometric mean over prose and code; "
                f"lower is better), then mean task accuracy in % (original: "
                f"{100 * mean_acc(base):.1f}).", "",
                "| variant | output | time ÷ observe | " + " | ".join(
                    f"{round(r * 100, 1)}% ({mrows[0]['num_experts']}→"
                    f"{next(x['experts'] for x in mrows if x['ratio'] == r)})" for r in ratios) + " |",
                "|---|---|---:|" + "---:|" * len(ratios)]
        variants = list(dict.fromkeys(r["variant"] for r in mrows))
        largest = {r["variant"]: geo_ppl(r, base) for r in mrows if r["ratio"] == ratios[-1]}
        variants.sort(key=lambda v: largest.get(v, math.inf))  # variants not yet run there go last
        for v in variants:
            cells = []
            for ratio in ratios:
                r = next((x for x in mrows if x["variant"] == v and x["ratio"] == ratio), None)
                cells.append(f"{geo_ppl(r, base):.3f}× ({100 * mean_acc(r):.1f})" if r else "—")
            vrows = [x for x in mrows if x["variant"] == v]
            out.append(f"| {v} | {output_format(vrows[0])} | {cost(vrows)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def output_format(row) -> str:
    """The output format; rows written before it was recorded: mone (with or without vectors) is novices."""
    return row.get("format") or (NOVICE if row["method"] == "mone" else STOCK)


def cost(vrows) -> str:
    """Planning cost relative to the observe pass of the same run (mean over ratios): for observe-once rows
    the plan alone; for whole-prune rows the whole prune (observe + plan + surgery + fit + write)."""
    # a whole prune and the observe pass ran minutes apart under other loads here: its ratio would say
    # more about the machine than the method, so those are measured side by side instead
    # (`benchmarks/compensation_cost.py`)
    timed = [x for x in vrows if x.get("observe_seconds") and "plan_seconds" in x]
    ratios = [x["plan_seconds"] / x["observe_seconds"] for x in timed]
    if not ratios:
        return "whole prune: see cost" if any("prune_seconds" in x for x in vrows) else "—"
    return f"plan {sum(ratios) / len(ratios):.3f}×"


MERGES = ("dek", "hc_smoe", "msmoe", "uncurl", "ream")


def best_of(sel: list[dict], base) -> str:
    if not sel:
        return "—"
    r = min(sel, key=lambda x: geo_ppl(x, base))
    return f"{geo_ppl(r, base):.3f}× ({r['variant']})"


def one_of(rows: list[dict], variant: str, base) -> str:
    r = next((x for x in rows if x["variant"] == variant), None)
    return f"{geo_ppl(r, base):.3f}×" if r else "—"


def best_recipes(rows: list[dict]) -> str:
    """Per model and ratio: the best stock output, the best of any format, against REAP, MoNE and the best
    merge (geometric-mean perplexity ratio, the variant in brackets)."""
    out = ["| model | removed | best stock output | best any format | REAP, no fit | MoNE, no fit "
           "| best merge |",
           "|---|---:|---|---|---:|---:|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next((r for r in rows if r["model"] == model and r["variant"] == "original"), None)
        mrows = [r for r in rows if r["model"] == model and r["calibration"] == "mixed"]
        if base is None:
            continue
        for ratio in sorted({r["ratio"] for r in mrows}):
            at = [r for r in mrows if r["ratio"] == ratio]
            stock = best_of([r for r in at if output_format(r) == STOCK], base)
            merges = best_of([r for r in at if r["method"] in MERGES], base)
            out.append(f"| {model} | {round(ratio * 100, 1)}% | {stock} | {best_of(at, base)} | "
                       f"{one_of(at, 'reap', base)} | {one_of(at, 'mone', base)} | {merges} |")
    return "\n".join(out)


def readme_section(rows: list[dict], settings: str) -> str:
    """The README's quality section: the best recipe per model first, then every variant's summary."""
    return "\n".join([
        "### Quality on the testbed", "",
        "`python benchmarks/quality.py` runs every method and variant on both testbed models at 12.5 / 25 / "
        "37.5 / 50 % of experts removed and scores the held-out *test* split. `ppl ×` is the geometric mean "
        "over prose and code of perplexity / original; the number in brackets is the mean accuracy (%) of "
        "the four local tasks. Rows marked `+down`, `+router`, `+novices`, `+lowrank`, `-global` and `-seq` "
        "are the whole `moeprune prune` path (`--compensate ...`, sequential; `-global`: `--budget global`), "
        "written, reloaded as a user would and "
        "scored; the others are planned once from one observe pass and applied in memory. "
        "`output` says what loads the result: `stock` is any transformers/vLLM, `moeprune (novices)` is "
        "`moeprune.from_pretrained`. `time ÷ observe` is the planning time relative to the observe pass "
        "of the same run; the whole-prune rows' cost is measured side by side in "
        "`benchmarks/results/compensation_cost.md` (below). Full tables: `benchmarks/results/quality.md`.",
        "",
        settings, "",
        "**Best recipe per model and ratio** (what to run; `+down` = `--compensate down`, which `prune` now "
        "does by default; `REAP` and `MoNE` are the published methods without a fit):", "",
        best_recipes(rows), "",
        summary(rows),
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral-8e,qwen-fine")
    ap.add_argument("--ratios", default="0.125,0.25,0.375,0.5")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS + PRUNED))
    ap.add_argument("--no-task-specific", dest="task_specific", action="store_false")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16384, help="test tokens per domain for perplexity")
    ap.add_argument("--task-items", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report-only", action="store_true", help="rewrite the reports from the rows only")
    ap.add_argument("--readme", action="store_true", help="print the README's quality section and stop")
    args = ap.parse_args()
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.variant_order = args.variants.split(",")
    args.variants = set(args.variant_order)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    RESULTS.mkdir(exist_ok=True)
    rows_file = RESULTS / "quality_rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {r["key"]: r for r in rows}

    def sink(row):
        rows.append(row)
        done[row["key"]] = row
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_reports(rows, args)

    if args.readme:
        settings = settings_text(args.samples, args.seq_len, args.max_tokens, args.task_items)
        print(readme_section(rows, settings))
        return
    for name in [] if args.report_only else args.models.split(","):
        run_model(name, args, done, sink)
    write_reports(rows, args)


def write_reports(rows, args):
    settings = settings_text(args.samples, args.seq_len, args.max_tokens, args.task_items)
    (RESULTS / "quality.md").write_text(render(rows, settings) + "\n## Best recipe per model and ratio\n\n"
                                        + best_recipes(rows) + "\n\n## Summary\n\n" + summary(rows))
    (RESULTS / "quality.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
