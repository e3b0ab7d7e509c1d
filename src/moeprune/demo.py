"""`moeprune demo`: the whole flow on the offline testbed, before and after, in one command.

Builds (or reuses) the trained `mixtral-8e` testbed, prunes 25% of its experts with the method the
quality benchmark found best on it, evaluates both models on held-out prose and code (perplexity
and the testbed's zero-shot tasks), and prints the table. Everything is cached under the
testbed cache: a second run reuses the testbed, the pruned checkpoint and its evaluation.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

# The method that kept most quality on mixtral-8e at 25% in benchmarks/quality.py (perplexity
# 1.003x the original; see benchmarks/results/quality.md).
DEFAULT_METHOD = "frequency"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(*, method: str = DEFAULT_METHOD, ratio: float = 0.25, testbed: str = "mixtral-8e",
             samples: int = 64, seq_len: int = 256, max_tokens: int = 32768, task_items: int = 100,
             cache_dir: str | None = None, rebuild: bool = False) -> dict:
    """Run the demo and return the evaluation report (see `moeprune.evaluate.evaluate_models`)."""
    from moeprune.api import prune
    from moeprune.evaluate import evaluate_models
    from moeprune.plan import Plan
    from moeprune.testbed import build_corpus, cache_root, get_testbed

    started = time.perf_counter()
    _say(f"[1/3] testbed {testbed}: build or reuse (training takes ~10-15 minutes the first time)")
    base = get_testbed(testbed, cache_dir, progress=True)
    corpus = build_corpus(cache_dir)
    out = cache_root(cache_dir) / "demo" / f"{base.name}-{method}-{round(ratio * 1000)}"
    plan_file = out / "moeprune_plan.json"
    settings = {"samples": samples, "seq_len": seq_len, "seed": 0}
    fresh = (plan_file.is_file() and Plan.load(plan_file).method == method
             and json.loads((out / "demo_settings.json").read_text()) == settings
             if (out / "demo_settings.json").is_file() else False)
    if fresh and not rebuild:
        _say(f"[2/3] reusing pruned checkpoint {out}")
    else:
        _say(f"[2/3] pruning {ratio:.0%} of the experts with {method}, calibrated on the mixed training split")
        prune(base, method, out, ratio=ratio, calib=str(corpus.path("mixed", "train")), force=True,
              command=f"moeprune demo --method {method} --ratio {ratio}", **settings)
        (out / "demo_settings.json").write_text(json.dumps(settings))
    texts = [corpus.path("prose", "test"), corpus.path("code", "test")]
    eval_settings = {"max_tokens": max_tokens, "task_items": task_items, "seq_len": 512,
                     "plan_sha256": hashlib.sha256(plan_file.read_bytes()).hexdigest(),
                     "corpus": corpus.version, "base": base.name}
    cached = out / "demo_eval.json"
    report = json.loads(cached.read_text()) if cached.is_file() else {}
    if report.get("eval_settings") == eval_settings and not rebuild:
        _say(f"[3/3] reusing the evaluation of both models ({cached}; --rebuild to redo it)")
    else:
        _say("[3/3] evaluating both models on the held-out test split")
        report = evaluate_models(
            [base, out], texts=texts, task_texts={"prose": texts[0], "code": texts[1]}, task_items=task_items,
            max_tokens=max_tokens, seq_len=512, progress=True,
        )
        report["eval_settings"] = eval_settings
        cached.write_text(json.dumps(report, indent=1))
    report["models"][0]["name"] = "original"
    report["models"][1]["name"] = f"{method} -{ratio:.0%}"
    report["demo"] = {"method": method, "ratio": ratio, "base": str(base), "pruned": str(out),
                      "seconds": round(time.perf_counter() - started, 1)}
    return report
