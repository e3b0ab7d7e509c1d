"""What compensation and `auto` cost, relative to the observe pass, measured side by side in one run.

For each testbed model, one after the other in this process (same load): the observe pass alone
(`moeprune observe`'s walk over the checkpoint, layer by layer), then `moeprune prune` at 50% with
REAP (one walk: observe, plan, surgery, write), with `--sequential` (the walk compensation uses, no
fit), with `--compensate down`, MoNE with `--compensate down+lowrank`, and `auto` with
`--compensate down`. Each is reported as seconds ÷ the observe pass, and the fit's own cost as
(compensated − sequential) ÷ observe. Calibration as `benchmarks/quality.py` (64 × 256 tokens).

    python benchmarks/compensation_cost.py            # both testbeds; writes results/compensation_cost.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
RUNS = [  # (label, method, options, compensate, sequential)
    ("reap", "reap", {}, "none", False),
    ("reap --sequential", "reap", {}, "none", True),
    ("reap --compensate down", "reap", {}, "down", True),
    ("mone --compensate down+lowrank", "mone", {}, "down+lowrank", True),
    ("auto --compensate down", "auto", {}, "down", True),
    # refused where the router is not renormalised over the top-k (qwen-fine)
    ("reap --compensate router+down", "reap", {}, "router+down", True),
]


def measure(name: str, samples: int, seq_len: int) -> list[dict]:
    from moeprune.api import observe_checkpoint, prune
    from moeprune.data import calibration_blocks
    from moeprune.errors import MoepruneError
    from moeprune.store.checkpoint import load_tokenizer
    from moeprune.testbed import build_corpus, get_testbed

    base = get_testbed(name)
    calib = str(build_corpus().path("mixed", "train"))
    common = dict(samples=samples, seq_len=seq_len, batch_size=8, seed=0, probe_size=512)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeprune-cost-") as d:
        # every command below tokenises the calibration file first (the whole file, so the blocks are drawn
        # from all of it): timed on its own so the walk itself can be compared
        t0 = time.perf_counter()
        calibration_blocks(load_tokenizer(base), calib, samples=samples, seq_len=seq_len, seed=0)
        rows.append({"model": name, "run": "tokenise", "seconds": time.perf_counter() - t0})
        t0 = time.perf_counter()
        observe_checkpoint(base, calib, progress=False, **common)
        t_observe = time.perf_counter() - t0
        rows.insert(0, {"model": name, "run": "observe", "seconds": t_observe})
        for i, (label, method, options, compensate, sequential) in enumerate(RUNS):
            t0 = time.perf_counter()
            try:
                prune(base, method, Path(d) / f"out{i}", ratio=0.5, calib=calib, progress=False,
                      options=options, sequential=sequential, compensate=compensate, **common)
            except MoepruneError as e:
                print(f"{name}: {label} refused: {e}")
                continue
            rows.append({"model": name, "run": label, "seconds": time.perf_counter() - t0})
    return rows


def render(rows: list[dict]) -> str:
    out = ["# Compensation cost", "",
           "Seconds of each run ÷ the observe command on the same model, measured one after the other "
           "in one process (`benchmarks/compensation_cost.py`; 50% of experts removed, calibration "
           "64 × 256 tokens). Every command first tokenises the whole calibration file (the `tokenise` row); "
           "`walk` is a run without it. `fit ÷ observe walk` = (run − `reap --sequential`) ÷ (observe − "
           "tokenise): what the fit itself adds, against the observe pass over the layers.", "",
           "| model | run | ÷ observe | walk ÷ observe walk | fit ÷ observe walk |",
           "|---|---|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        observe = next(r for r in mrows if r["run"] == "observe")["seconds"]
        tok = next((r["seconds"] for r in mrows if r["run"] == "tokenise"), 0.0)
        walk = observe - tok
        seq = next(r for r in mrows if r["run"] == "reap --sequential")
        for r in mrows:
            fit = (r["seconds"] - seq["seconds"]) / walk if "compensate" in r["run"] else None
            own = "" if r["run"] == "tokenise" else f"{(r['seconds'] - tok) / walk:.2f}×"
            out.append(f"| {model} | {r['run']} | {r['seconds'] / observe:.2f}× | {own} | "
                       f"{'' if fit is None else f'{fit:.2f}×'} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral-8e,qwen-fine")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for name in args.models.split(",") for r in measure(name, args.samples, args.seq_len)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compensation_cost.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "compensation_cost.md").write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
