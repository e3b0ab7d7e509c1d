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
]


def measure(name: str, samples: int, seq_len: int) -> list[dict]:
    from moeprune.api import observe_checkpoint, prune
    from moeprune.testbed import build_corpus, get_testbed

    base = get_testbed(name)
    calib = str(build_corpus().path("mixed", "train"))
    common = dict(samples=samples, seq_len=seq_len, batch_size=8, seed=0, probe_size=512)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeprune-cost-") as d:
        t0 = time.perf_counter()
        observe_checkpoint(base, calib, progress=False, **common)
        t_observe = time.perf_counter() - t0
        rows.append({"model": name, "run": "observe", "seconds": t_observe})
        for i, (label, method, options, compensate, sequential) in enumerate(RUNS):
            t0 = time.perf_counter()
            prune(base, method, Path(d) / f"out{i}", ratio=0.5, calib=calib, progress=False, options=options,
                  sequential=sequential, compensate=compensate, **common)
            rows.append({"model": name, "run": label, "seconds": time.perf_counter() - t0})
    for r in rows:
        r["per_observe"] = r["seconds"] / t_observe
    return rows


def render(rows: list[dict]) -> str:
    out = ["# Compensation cost", "",
           "Seconds of each run ÷ the observe pass of the same model, measured one after the other "
           "in one process (`benchmarks/compensation_cost.py`; 50% of experts removed, calibration "
           "64 × 256 tokens). "
           "`fit` = (run − `reap --sequential`) ÷ observe: what the fit itself adds.", "",
           "| model | run | ÷ observe | fit ÷ observe |", "|---|---|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        seq = next(r for r in mrows if r["run"] == "reap --sequential")
        for r in mrows:
            fit = (r["seconds"] - seq["seconds"]) / mrows[0]["seconds"] if "compensate" in r["run"] else None
            out.append(f"| {model} | {r['run']} | {r['per_observe']:.2f}× | "
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
