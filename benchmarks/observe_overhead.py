"""Observe-pass overhead: wall time of `moeprune.observe` divided by a plain forward pass.

Both run in this process over the same token batches, interleaved, several times; the figure is
the median ratio. Timings on shared machines are noisy, which is why only the ratio is reported.

    python benchmarks/observe_overhead.py [--families mixtral,qwen3_moe] [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moeprune.arch.tiny import tiny_model
from moeprune.observe import observe

RESULTS = Path(__file__).parent / "results"


def plain_pass(model, ids, batch_size):
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size], use_cache=False)


def measure(family: str, repeats: int, samples: int, seq_len: int, batch_size: int, size: dict) -> dict:
    model = tiny_model(family, **size)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len))
    plain_pass(model, ids, batch_size)  # warm-up: allocator and oneDNN caches
    observe(model, ids, batch_size=batch_size)
    ratios, plain_times, observe_times = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_pass(model, ids, batch_size)
        t1 = time.perf_counter()
        observe(model, ids, batch_size=batch_size)
        t2 = time.perf_counter()
        plain_times.append(t1 - t0)
        observe_times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return {"family": family, "tokens": samples * seq_len, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "repeats": repeats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="mixtral,qwen2_moe,qwen3_moe,deepseek_v3,gpt_oss")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    torch.manual_seed(0)
    # the testbed's scale (hidden 256, 4 layers) rather than the 64-wide unit-test models, whose
    # forward is so small that Python overhead dominates both sides
    size = dict(hidden_size=256, num_hidden_layers=4)
    rows = [measure(f, args.repeats, args.samples, args.seq_len, args.batch_size, size)
            for f in args.families.split(",")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "observe_overhead.json").write_text(
        json.dumps({"config": vars(args) | size, "rows": rows}, indent=1)
    )
    lines = ["| family | tokens | observe / forward (median) | min | max |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['family']} | {r['tokens']} | **{r['ratio_median']:.2f}×** | {r['ratio_min']:.2f}× | "
              f"{r['ratio_max']:.2f}× |" for r in rows]
    table = "\n".join(lines)
    settings = (f"Settings: {args.samples} × {args.seq_len} tokens per forward (batch {args.batch_size}), "
                f"median of {args.repeats} interleaved runs, random models of hidden size 256 and 4 layers, "
                f"{args.threads} torch threads "
                f"(`python benchmarks/observe_overhead.py --repeats {args.repeats} "
                f"--threads {args.threads}`).")
    (RESULTS / "observe_overhead.md").write_text(settings + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
