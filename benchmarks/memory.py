"""Out-of-core pruning: peak RSS and wall time of layer-by-layer pruning against a plain layer-by-layer
forward.

A synthetic random-weight Qwen3-MoE checkpoint (default 24 layers x 64 experts top-8, hidden 1024,
moe_intermediate 512, bf16, one shard per layer: 4.63 GiB) is written shard by shard (never the whole
model in memory) and cached under ~/.cache/moeprune/bench/ by shape. Every measured job runs in a
fresh subprocess; its peak RSS is ru_maxrss of exactly that child from os.wait4, its time the wall
time from spawn to exit (interpreter start and imports included). Jobs:

  baseline           moeprune.pipeline.forward_layerwise over the calibration tokens (no observation)
  layerwise reap     moeprune prune --layerwise --method reap --ratio 0.25
  layerwise mone     moeprune prune --layerwise --method mone --ratio 0.25
  plain prune reap   moeprune prune --method reap --ratio 0.25 (no flag: what the default chooses)
  in-memory reap     moeprune prune --in-memory --method reap --ratio 0.25 (skipped if RAM is short)

then, if a cgroup v1 memory controller is writable, the layerwise reap and the in-memory reap again
under a memory limit of 0.5 x the checkpoint size. Goals: peak RSS <= 0.35 x checkpoint size, time
<= 1.5 x the baseline. Results: benchmarks/results/memory.md and memory.json.

    python benchmarks/memory.py [--size-gb 4.6] [--samples 16] [--seq-len 128] [--batch-size 8]
                                [--repeats 3] [--no-in-memory] [--no-cgroup] [--check-keys]

The harness process itself never imports torch: a child's ru_maxrss starts from the RSS high-water
mark of the process that spawned it, so everything heavy (generation, checks) runs in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MOEPRUNE_BENCH_CACHE", "~/.cache/moeprune/bench")).expanduser()
GIB = 1024**3
FORMAT = 1  # bump when the generated checkpoint changes, so stale caches are not reused

# the shape of docs/out_of_core.md, "Memory figures"; the layer count follows --size-gb
SHAPE = dict(
    hidden_size=1024, moe_intermediate_size=512, intermediate_size=3072, num_experts=64,
    num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=1024,
)
JOB_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "OMP_WAIT_POLICY": "PASSIVE"}
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BASELINE_MODULE = "moeprune.pipeline"  # provides forward_layerwise(model_path, input_ids, batch_size=8)
# the goals below were set for the walk without compensation, so these jobs turn it off; "compensated" is
# the default prune (`--compensate auto`, which is down here), measured against the same goals
PRUNE_MODES = {"layerwise": ["--layerwise", "--compensate", "none"],
               "in-memory": ["--in-memory", "--compensate", "none"],
               "default": ["--compensate", "none"], "compensated": ["--layerwise", "--compensate", "down"]}
RATIO = 0.25
GOAL_RSS, GOAL_TIME = 0.35, 1.5


# ---- the checkpoint's tensors (pure Python: the harness uses it for sizes) ------------------------------

def tensor_specs(c: dict) -> tuple[list, list]:
    """(non-layer tensors, [per-layer tensors]) as (on-disk name, shape), in save_pretrained's per-expert
    layout."""
    H, inter, E = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
    hd, nq, nkv, V = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    top = [("model.embed_tokens.weight", (V, H)), ("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    layers = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
             (p + "self_attn.q_proj.weight", (nq * hd, H)), (p + "self_attn.k_proj.weight", (nkv * hd, H)),
             (p + "self_attn.v_proj.weight", (nkv * hd, H)), (p + "self_attn.o_proj.weight", (H, nq * hd)),
             (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
             (p + "mlp.gate.weight", (E, H))]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t += [
                (q + "gate_proj.weight", (inter, H)),
                (q + "up_proj.weight", (inter, H)),
                (q + "down_proj.weight", (H, inter)),
            ]
        layers.append(t)
    return top, layers


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def layer_bytes(c: dict) -> int:
    return 2 * sum(_numel(s) for _, s in tensor_specs(c | {"num_hidden_layers": 1})[1][0])


def shape_for(size_gb: float) -> dict:
    layers = max(2, round(size_gb * GIB / layer_bytes(SHAPE | {"num_hidden_layers": 1})))
    return SHAPE | {"num_hidden_layers": layers}


def cache_name(c: dict) -> str:
    return (
        f"qwen3moe-L{c['num_hidden_layers']}-E{c['num_experts']}-k{c['num_experts_per_tok']}-H{c['hidden_size']}"
        f"-I{c['moe_intermediate_size']}-a{c['num_attention_heads']}x{c['num_key_value_heads']}x{c['head_dim']}"
        f"-v{c['vocab_size']}-bf16-f{FORMAT}"
    )


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# ---- workers: run as `python memory.py _worker NAME JSON` in their own process -------------------------

def _qwen3_config(c: dict):
    import transformers as tf

    return tf.Qwen3MoeConfig(
        **{k: v for k, v in c.items() if k != "num_hidden_layers"}, num_hidden_layers=c["num_hidden_layers"],
        norm_topk_prob=True, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4096, dtype="bfloat16",
    )


def check_keys() -> dict:
    """tensor_specs against what Qwen3MoeForCausalLM(config).save_pretrained writes for a tiny 2-layer
    model."""
    import torch
    import transformers as tf
    from safetensors import safe_open

    tiny = dict(
        hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_experts=6, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=128, num_hidden_layers=2,
    )
    tf.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        tf.Qwen3MoeForCausalLM(_qwen3_config(tiny)).to(torch.bfloat16).save_pretrained(d)
        disk = {}
        for f in Path(d).glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                disk.update(
                    {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
                )
    top, layers = tensor_specs(tiny)
    ours = {k: (s, "BF16") for k, s in top + [t for lay in layers for t in lay]}
    if ours != disk:
        diff = sorted(set(ours.items()) ^ set(disk.items()))[:6]
        raise SystemExit(f"tensor_specs disagree with save_pretrained (ours ^ theirs, first 6): {diff}")
    return {"keys_checked": len(disk)}


def w_generate(a: dict) -> dict:
    """Write the checkpoint shard by shard into a['dir'] (via a '.partial' directory renamed at the end)."""
    import torch
    from safetensors.torch import save_file

    from moeprune.arch.tiny import tiny_tokenizer

    checked = check_keys()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # modest: the machine is shared
    final, c = Path(a["dir"]), dict(a["shape"])
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = tiny_tokenizer(c["vocab_size"])
    c["vocab_size"] = len(tok)  # the config matches the tokenizer exactly
    tok.save_pretrained(str(tmp))
    cfg = _qwen3_config(c)
    cfg.eos_token_id = cfg.pad_token_id = tok.eos_token_id
    cfg.save_pretrained(str(tmp))
    top, layers = tensor_specs(c)
    n_files, weight_map, total = len(layers) + 1, {}, 0

    def make(specs, seed):
        g = torch.Generator().manual_seed(seed)
        return {k: (torch.ones(s, dtype=torch.bfloat16) if k.endswith("norm.weight")
                    else (torch.randn(s, generator=g) * a["std"]).to(torch.bfloat16)) for k, s in specs}

    t0 = time.perf_counter()
    for i, specs in enumerate([*layers, top]):
        sd = make(specs, 1000 + i)
        fn = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(sd, str(tmp / fn), metadata={"format": "pt"})
        for k, v in sd.items():
            weight_map[k] = fn
            total += v.numel() * v.element_size()
        del sd
        print(f"shard {i + 1}/{n_files} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
        )
    )
    info = {"shape": c, "tensor_bytes": total, "std": a["std"], "files": n_files, **checked}
    (tmp / "bench_checkpoint.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return info


def w_baseline(a: dict) -> dict:
    """The time baseline: a plain layer-by-layer forward over exactly the tokens prune uses."""
    import importlib

    import torch

    from moeprune import return_freed_memory_to_the_system
    from moeprune.data import calibration_blocks
    from moeprune.store.checkpoint import load_tokenizer

    return_freed_memory_to_the_system()  # what the `moeprune` command does in its own process, as prune has
    forward_layerwise = importlib.import_module(a["module"]).forward_layerwise
    ids = calibration_blocks(
        load_tokenizer(a["model"]), a["calib"], samples=a["samples"], seq_len=a["seq_len"], seed=0
    ).input_ids
    t0 = time.perf_counter()
    out = forward_layerwise(a["model"], ids, batch_size=a["batch_size"])
    res = {"forward_s": time.perf_counter() - t0, "tokens": list(ids.shape)}
    outs = out if isinstance(out, list | tuple) else [out]
    if outs and all(isinstance(t, torch.Tensor) for t in outs):
        res["output_finite"] = all(bool(torch.isfinite(t.float()).all()) for t in outs)
    return res


def w_verify(a: dict) -> dict:
    """Load a pruned checkpoint for real and run a short forward; optionally compare it with another
    output."""
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    res: dict = {}
    t0 = time.perf_counter()
    if a["loader"] == "transformers":
        model, info = tf.AutoModelForCausalLM.from_pretrained(
            a["out"], output_loading_info=True, dtype="auto"
        )
        res["loading_problems"] = {k: list(map(str, v))[:5] for k, v in info.items() if v}
    else:
        import moeprune

        model = moeprune.from_pretrained(a["out"])
        res["loading_problems"] = {}
    res["load_s"] = time.perf_counter() - t0
    cfg = model.config
    res["num_experts"] = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    res["params"] = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    res["logits_finite"] = bool(torch.isfinite(logits.float()).all())
    res["ok"] = not res["loading_problems"] and res["logits_finite"]
    return res


def w_compare(a: dict) -> dict:
    """Tensor-by-tensor equality of two outputs, streamed one shard at a time; plus their plans' expert
    groups."""
    import torch
    from safetensors import safe_open

    def plan_groups(d):
        p = Path(d) / "moeprune_plan.json"
        return (
            [[g["members"] for g in lp["groups"]] for lp in json.loads(p.read_text())["layers"]]
            if p.is_file()
            else None
        )

    def index(d):
        wm = weight_map(Path(d))
        if wm is None:  # single-file output
            with safe_open(str(Path(d) / "model.safetensors"), "pt") as h:
                wm = dict.fromkeys(h.keys(), "model.safetensors")
        return wm

    wa, wb = index(a["a"]), index(a["b"])
    res = {"same_plan": plan_groups(a["a"]) == plan_groups(a["b"]), "same_keys": set(wa) == set(wb),
           "tensors": 0, "equal": 0, "max_abs_diff": 0.0}
    by_file: dict = {}
    for k in sorted(set(wa) & set(wb)):
        by_file.setdefault(wa[k], []).append(k)
    for fa, keys in by_file.items():
        with safe_open(str(Path(a["a"]) / fa), "pt") as ha:
            for k in keys:
                with safe_open(str(Path(a["b"]) / wb[k]), "pt") as hb:
                    x, y = ha.get_tensor(k), hb.get_tensor(k)
                res["tensors"] += 1
                if x.shape == y.shape and torch.equal(x, y):
                    res["equal"] += 1
                elif x.shape == y.shape:
                    res["max_abs_diff"] = max(res["max_abs_diff"], float((x.float() - y.float()).abs().max()))
    return res


WORKERS = {"generate": w_generate, "baseline": w_baseline, "verify": w_verify, "compare": w_compare,
           "check_keys": lambda a: check_keys()}


def worker_main(name: str, arg: str) -> None:
    res = WORKERS[name](json.loads(arg))
    print("BENCH_RESULT " + json.dumps(res), flush=True)


# ---- the harness (stdlib only) ----------------------------------------------------------------------

def job_env() -> dict:
    env = dict(os.environ) | JOB_ENV | QUIET_ENV
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def meminfo() -> dict:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0]) * 1024
    return out


def self_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run(name: str, cmd: list[str], log: Path, prefix: list[str] | None = None) -> dict:
    """Run cmd in a fresh process; its peak RSS from os.wait4 (ru_maxrss, kB) and its wall time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = loadavg()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [*(prefix or []), *cmd], stdout=fh, stderr=subprocess.STDOUT, env=job_env(), cwd=REPO
        )
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    result = next((json.loads(line.split(" ", 1)[1]) for line in reversed(text.splitlines())
                   if line.startswith("BENCH_RESULT ")), None)
    # what `moeprune prune` said it chose, and why
    mode = next((ln.strip() for ln in text.splitlines()
                 if ln.startswith(("layer by layer", "whole model in memory"))), None)
    row = {"job": name, "rc": rc, "mode": mode,
           "peak_rss_kb": ru.ru_maxrss, "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
           "loadavg_before": load, "log": str(log), "result": result}
    if rc != 0:
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        tail = [ln for ln in text.splitlines()[1:] if ln.strip()][-6:]
        row["error"] = f"{how}" + (": " + " | ".join(tail) if tail else " (no output)")
    print(f"  {name}: rc={rc} peak {ru.ru_maxrss / 2**20:.2f} GiB, {wall:.1f} s"
          + (f"  ERROR {row['error'][:300]}" if rc else ""), flush=True)
    return row


def worker(name: str, args: dict, log: Path) -> dict:
    return run(
        f"_{name}", [sys.executable, str(Path(__file__).resolve()), "_worker", name, json.dumps(args)], log
    )


def read_through(d: Path) -> None:
    """Put a directory's files in the page cache (1 MiB buffer: the harness RSS stays small)."""
    buf = bytearray(1 << 20)
    for f in sorted(d.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def evict(d: Path) -> None:
    """Drop a directory's clean pages from the page cache (so a cgroup run reads, and is charged for,
    them)."""
    for f in d.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def weight_map(d: Path) -> dict | None:
    """{on-disk name: file} from the index; None without one (a single model.safetensors is reported as
    such)."""
    idx = d / "model.safetensors.index.json"
    return json.loads(idx.read_text())["weight_map"] if idx.is_file() else None


def check_output(out: Path, src_bytes: int, expect_ratio: float) -> dict:
    """Index present, every weight_map file present, total size near the expected fraction of the source."""
    wm = weight_map(out)
    if wm is None and (out / "model.safetensors").is_file():
        wm = {"*": "model.safetensors"}  # one unsharded file (save_pretrained below its shard size); no index
    elif wm is None:
        return {"ok": False, "index": False, "problem": f"no model.safetensors(.index.json) in {out}",
                "size_ratio": float("nan"), "files": sorted(p.name for p in out.glob("*"))[:10]}
    files = sorted(set(wm.values()))
    missing = [f for f in files if not (out / f).is_file()]
    mapped = sum((out / f).stat().st_size for f in files if f not in missing)
    all_st = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    ratio = mapped / src_bytes
    ok = not missing and abs(ratio - expect_ratio) < 0.03
    problem = f"missing {missing[:3]}" if missing else f"size ratio {ratio:.3f}, expected ~{expect_ratio:.3f}"
    return {
        "ok": ok, "index": "*" not in wm, "weight_files": len(files), "missing_files": missing,
        "weights_bytes": mapped, "all_safetensors_bytes": all_st, "size_ratio": ratio,
        "expected_ratio": expect_ratio, **({} if ok else {"problem": problem}),
    }


def pipeline_flags() -> str | None:
    """None if `moeprune prune --help` lists every flag this benchmark needs, else what is missing."""
    p = subprocess.run([sys.executable, "-m", "moeprune", "prune", "--help"], capture_output=True, text=True,
                       env=job_env() | {"COLUMNS": "200"}, cwd=REPO)
    missing = [f for flags in PRUNE_MODES.values() for f in flags if f not in p.stdout]
    if p.returncode != 0 or missing:
        return f"`moeprune prune --help` (rc {p.returncode}) lists no {', '.join(missing)} " + (
            p.stderr.strip()[-300:] or ""
        )
    return None


class MemCgroup:
    """A cgroup v1 memory group under this process's own, with a hard limit."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit: int):
        rel = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":")[1] == "memory")
        self.path = self.ROOT / rel.lstrip("/") / f"moeprune-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())

    def prefix(self) -> list[str]:  # the job's shell joins the group, then execs the job
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def reset(self) -> None:
        for f in ("memory.max_usage_in_bytes", "memory.failcnt"):
            (self.path / f).write_text("0")

    def stats(self) -> dict:
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {
            "limit_bytes": self.limit,
            "max_usage_bytes": int((self.path / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((self.path / "memory.failcnt").read_text()),
            "oom_kill": int(oom.get("oom_kill", -1)),
        }

    def remove(self) -> None:
        for _ in range(20):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.5)


def calib_file(samples: int, seq_len: int) -> Path:
    """Python standard-library source, concatenated in sorted order (the tiny tokenizer is near
    byte-level)."""
    need = max(2_000_000, 16 * samples * seq_len)
    path = CACHE / f"calib-stdlib-{need}.txt"
    if not path.is_file():
        parts, n = [], 0
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            t = f.read_text(errors="replace")
            parts.append(t)
            n += len(t)
            if n >= need:
                break
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(parts))
        tmp.replace(path)
    return path


def machine() -> dict:
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "kernel": platform.release(),
            "python": platform.python_version(), "mem_total_gib": meminfo()["MemTotal"] / GIB, **versions}


def fmt_row(r: dict, ckpt: int, base_s: float | None, goals: bool) -> str:
    if r.get("skipped"):
        return f"| {r['job']} | — | — | — | — | — | — | skipped: {r['skipped']} |"
    gib = r["peak_rss_kb"] * 1024 / GIB
    frac = r["peak_rss_kb"] * 1024 / ckpt
    rel = r["wall_s"] / base_s if base_s else None
    ok = r["rc"] == 0
    rss_goal = ("yes" if frac <= GOAL_RSS else "**no**") if goals and ok else "—"
    time_goal = (
        ("yes" if rel is not None and rel <= GOAL_TIME else "**no**")
        if goals and ok and rel is not None
        else "—"
    )
    status = "ok" if ok else f"FAILED ({r['error'][:160]})"
    if ok and r.get("output"):
        o = r["output"]
        status = (
            f"output {o['size_ratio']:.3f}× source"
            + ("" if o.get("index") else " (one file, no index)")
            + ("" if o["ok"] else f" — CHECK FAILED: {o.get('problem')}")
            + (f"; loads ({r['verify']})" if r.get("verify") else "")
        )
    rel_s = f"{rel:.2f}×" if rel is not None else "—"
    walls = r.get("wall_all", [])
    wall = f"{r['wall_s']:.1f}" + (f" ({min(walls):.1f}–{max(walls):.1f})" if len(walls) > 1 else "")
    cpu = f"{r['cpu_s']:.1f}"
    return (
        f"| {r['job']} | {gib:.2f} | {frac:.3f} | {wall} | {rel_s} | {cpu} | {rss_goal} / {time_goal} "
        f"| {status} |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size-gb", type=float, default=4.6, help="checkpoint size in GiB (sets the layer count)"
    )
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="runs per job, interleaved; median time, max peak")
    ap.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the whole-model comparison runs")
    ap.add_argument("--no-cgroup", action="store_true", help="skip the memory-limited (cgroup v1) runs")
    ap.add_argument(
        "--cgroup-fraction", type=float, default=0.5, help="cgroup memory limit / checkpoint size"
    )
    ap.add_argument(
        "--check-keys", action="store_true", help="only check the generator's key names and shapes"
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="where memory.md/json go")
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = CACHE / "logs" / stamp
    if args.check_keys:
        r = worker("check_keys", {}, logs / "check_keys.log")
        print(json.dumps(r["result"]) if r["rc"] == 0 else r["error"])
        sys.exit(r["rc"] != 0)

    start = {
        "loadavg": loadavg(),
        "mem_available_gib": meminfo()["MemAvailable"] / GIB,
        "time": time.strftime("%F %T"),
    }
    shape = shape_for(args.size_gb)
    ckpt = CACHE / cache_name(shape)
    est = shape["num_hidden_layers"] * layer_bytes(shape) + 4 * shape["vocab_size"] * shape["hidden_size"]
    cached = (ckpt / "bench_checkpoint.json").is_file()
    keep_two = not args.no_in_memory  # the layerwise reap output is kept to compare with the in-memory one
    need = (0 if cached else est) + (2 if keep_two else 1) * 0.8 * est + GIB // 2
    free = shutil.disk_usage(CACHE).free
    if free < need:
        sys.exit(
            f"memory.py: not enough disk space in {CACHE}: need {need / GIB:.1f} GiB (checkpoint "
            f"{est / GIB:.1f} GiB{' already cached' if cached else ''} + outputs), {free / GIB:.1f} GiB free"
        )
    missing = pipeline_flags()
    if missing:
        sys.exit(f"memory.py: the layer-by-layer pipeline is not there: {missing}")

    notes: list[str] = []
    if not cached:
        print(f"writing the {est / GIB:.2f} GiB checkpoint shard by shard to {ckpt}", flush=True)
        g = worker("generate", {"dir": str(ckpt), "shape": shape, "std": args.std}, logs / "generate.log")
        if g["rc"] != 0:
            sys.exit(f"memory.py: checkpoint generation failed: {g['error']}")
        print(
            f"  written in {g['wall_s']:.0f} s, generator peak RSS {g['peak_rss_kb'] / 2**20:.2f} GiB",
            flush=True,
        )
        notes.append(f"checkpoint generated in this run: {g['wall_s']:.0f} s, generator peak RSS "
                     f"{g['peak_rss_kb'] / 2**20:.2f} GiB (log {g['log']})")
    info = json.loads((ckpt / "bench_checkpoint.json").read_text())
    ck_bytes = dir_bytes(ckpt)
    st_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    c = info["shape"]
    expert_bytes = (
        2 * 3 * c["num_experts"] * c["hidden_size"] * c["moe_intermediate_size"] * c["num_hidden_layers"]
    )
    removed = round(RATIO * c["num_experts"]) / c["num_experts"]
    expect = (st_bytes - removed * expert_bytes) / st_bytes
    calib = calib_file(args.samples, args.seq_len)
    print(f"checkpoint {ckpt} ({ck_bytes / GIB:.2f} GiB), calibration {calib}", flush=True)

    work = Path(tempfile.mkdtemp(prefix=f"work-{stamp}-", dir=CACHE))
    common = ["--calib", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size)]

    def prune_cmd(method, mode, out):
        return [
            sys.executable, "-m", "moeprune", "prune", str(ckpt), "--method", method, "--ratio", str(RATIO),
            *common, "--out", str(out), *PRUNE_MODES[mode],
        ]

    base_args = {"module": BASELINE_MODULE, "model": str(ckpt), "calib": str(calib), "samples": args.samples,
                 "seq_len": args.seq_len, "batch_size": args.batch_size}
    in_mem_need = 2.5 * ck_bytes + GIB
    mem_avail = meminfo()["MemAvailable"]
    jobs = [
        ("baseline: forward_layerwise", None, None), ("layerwise reap 25%", "reap", "layerwise"),
        ("layerwise mone 25%", "mone", "layerwise"), ("plain prune reap 25% (no flag)", "reap", "default"),
        ("in-memory reap 25%", "reap", "in-memory"), ("layerwise reap 25%, compensated (the default)", "reap",
                                                        "compensated"),
    ]
    rows: dict[str, list] = {j[0]: [] for j in jobs}
    skipped: dict[str, str] = {}
    if args.no_in_memory:
        skipped["in-memory reap 25%"] = "--no-in-memory"
    elif mem_avail < in_mem_need:
        skipped["in-memory reap 25%"] = (
            f"MemAvailable {mem_avail / GIB:.1f} GiB < {in_mem_need / GIB:.1f} GiB (2.5 × checkpoint + 1 GiB)"
        )
    kept: dict[str, Path] = {}
    verify: dict[str, dict] = {}
    print(
        f"harness RSS high-water mark {self_hwm_kb() / 1024:.0f} MiB (a floor under every child's ru_maxrss)",
        flush=True,
    )
    for rep in range(args.repeats):
        for name, method, mode in jobs:
            if name in skipped:
                continue
            read_through(ckpt)  # the same warm page cache for every job
            tag = f"{name.split(':')[0].replace(' ', '-').replace('%', '')}-{rep}"
            if method is None:
                r = worker("baseline", base_args, logs / f"{tag}.log")
                r["job"] = name
            else:
                out = work / tag / "out"
                r = run(name, prune_cmd(method, mode, out), logs / f"{tag}.log")
                if r["rc"] == 0:
                    r["output"] = check_output(out, st_bytes, expect)
                    vkey = f"{method}-{mode}"
                    if rep == 0 and vkey not in verify and mode == "layerwise":
                        loader = "transformers" if method == "reap" else "moeprune"
                        v = worker("verify", {"out": str(out), "loader": loader}, logs / f"verify-{tag}.log")
                        verify[vkey] = {
                            "loader": loader, "rc": v["rc"], "peak_rss_gib": v["peak_rss_kb"] / 2**20,
                            **(v["result"] or {"error": v.get("error")}),
                        }
                        r["verify"] = (
                            "AutoModelForCausalLM" if loader == "transformers" else "moeprune.from_pretrained"
                        ) + (
                            ", 0 missing/unexpected/mismatched keys, finite logits"
                            if verify[vkey].get("ok")
                            else f" FAILED: {json.dumps(verify[vkey])[:200]}"
                        )
                    if rep == 0 and method == "reap" and mode == "layerwise" and keep_two:
                        kept["layerwise"] = out  # deleted after the comparison with the in-memory output
                        rows[name].append(r)
                        continue
                    if rep == 0 and method == "reap" and mode == "in-memory" and "layerwise" in kept:
                        v = worker(
                            "compare", {"a": str(kept["layerwise"]), "b": str(out)}, logs / "compare.log"
                        )
                        verify["layerwise vs in-memory reap"] = v["result"] or {"error": v.get("error")}
                        shutil.rmtree(kept.pop("layerwise").parent, ignore_errors=True)
                shutil.rmtree(out.parent, ignore_errors=True)
            rows[name].append(r)
    for p in kept.values():
        shutil.rmtree(p.parent, ignore_errors=True)

    # ---- the memory-limited runs ----
    cg: dict = {"attempted": not args.no_cgroup}
    if not args.no_cgroup:
        limit = int(args.cgroup_fraction * ck_bytes)
        try:
            group = MemCgroup(limit)
        except (OSError, StopIteration) as e:
            cg["error"] = f"could not create a cgroup v1 memory group: {type(e).__name__}: {e}"
            print("  " + cg["error"], flush=True)
        else:
            cg["path"] = str(group.path)
            cg["limit_bytes"] = group.limit
            try:
                # no mode flag: moeprune sees the cgroup limit and chooses layer by layer itself, as a new
                # user runs it
                for name, method, mode in [("reap 25%, no flag (auto), cgroup-limited", "reap", "default"),
                                           ("in-memory reap 25%, cgroup-limited", "reap", "in-memory")]:
                    if mode == "in-memory" and args.no_in_memory:
                        continue
                    before = meminfo()["Cached"]
                    evict(ckpt)  # cold cache: the job's own reads of the checkpoint are charged to the group
                    group.reset()
                    kills = group.stats()["oom_kill"]  # cumulative in the group: report this job's own
                    out = work / f"cgroup-{mode}" / "out"
                    r = run(
                        name, prune_cmd(method, mode, out), logs / f"cgroup-{mode}.log", prefix=group.prefix()
                    )
                    r["cgroup"] = group.stats() | {
                        "page_cache_dropped_gib": (before - meminfo()["Cached"]) / GIB
                    }
                    r["cgroup"]["oom_kill"] -= kills
                    if r["rc"] == 0:
                        r["output"] = check_output(out, st_bytes, expect)
                    shutil.rmtree(out.parent, ignore_errors=True)
                    cg.setdefault("rows", []).append(r)
            finally:
                group.remove()
    shutil.rmtree(work, ignore_errors=True)

    end = {
        "loadavg": loadavg(),
        "mem_available_gib": meminfo()["MemAvailable"] / GIB,
        "time": time.strftime("%F %T"),
    }
    summary = []
    for name, _, _ in jobs:
        rs = rows[name]
        if name in skipped:
            summary.append({"job": name, "skipped": skipped[name]})
        elif rs:
            good = [r for r in rs if r["rc"] == 0] or rs
            s = dict(good[0])
            s["wall_s"] = statistics.median(r["wall_s"] for r in good)
            s["wall_all"] = [r["wall_s"] for r in good]
            s["cpu_s"] = statistics.median(r["user_s"] + r["sys_s"] for r in good)
            s["peak_rss_kb"] = max(r["peak_rss_kb"] for r in good)
            s["runs"] = len(rs)
            summary.append(s)
    base = next((s for s in summary if s["job"].startswith("baseline") and s.get("rc") == 0), None)
    base_s = base["wall_s"] if base else None
    for s in summary:
        if not s.get("skipped"):
            s["peak_rss_gib"] = s["peak_rss_kb"] / 2**20
            s["peak_over_ckpt"] = s["peak_rss_kb"] * 1024 / ck_bytes
            s["time_over_baseline"] = s["wall_s"] / base_s if base_s else None
            if s["job"].startswith("layerwise") and s["rc"] == 0:
                s["meets_rss_goal"] = s["peak_over_ckpt"] <= GOAL_RSS
                s["meets_time_goal"] = (
                    s["time_over_baseline"] is not None and s["time_over_baseline"] <= GOAL_TIME
                )

    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"ratio": RATIO},
        "checkpoint": {
            "path": str(ckpt), "bytes": ck_bytes, "gib": ck_bytes / GIB, "safetensors_bytes": st_bytes,
            **info,
        },
        "calibration": {"file": str(calib), "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "env": JOB_ENV,
        "goals": {"peak_rss_over_ckpt": GOAL_RSS, "time_over_baseline": GOAL_TIME},
        "machine": machine(),
        "start": start,
        "end": end,
        "harness_hwm_kb": self_hwm_kb(),
        "summary": summary,
        "runs": rows,
        "verify": verify,
        "cgroup": cg,
        "notes": notes,
        "logs": str(logs),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "memory.json").write_text(json.dumps(report, indent=1, default=str))
    md = render(report, ck_bytes, base_s)
    (args.results / "memory.md").write_text(md)
    print(md)


def render(rep: dict, ck_bytes: int, base_s: float | None) -> str:
    c, m, ck = rep["checkpoint"]["shape"], rep["machine"], rep["checkpoint"]
    cfg = rep["config"]
    lines = [
        "# Out-of-core pruning: peak memory and time",
        "",
        f"Checkpoint: synthetic random-weight Qwen3-MoE, {c['num_hidden_layers']} layers × "
        f"{c['num_experts']} experts (top-{c['num_experts_per_tok']}), hidden {c['hidden_size']}, "
        f"moe_intermediate {c['moe_intermediate_size']}, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads of {c['head_dim']}, vocab {c['vocab_size']}, bf16, "
        f"{ck['files']} shards (one per layer), weights std {ck['std']}: **{ck['gib']:.2f} GiB**. "
        f"Calibration: {cfg['samples']} × {cfg['seq_len']} tokens of Python standard-library source "
        f"(seed 0), batch size {cfg['batch_size']}. Pruning removes {rep['config']['ratio']:.0%} of the "
        "experts of every layer.",
        "",
        "Every job is a fresh subprocess. Peak RSS is `ru_maxrss` of exactly that child from `os.wait4`; "
        "time is its wall time from spawn to exit, interpreter start and imports included"
        + (
            f" (median of {cfg['repeats']} interleaved runs, min–max in brackets; peak is the max)"
            if cfg["repeats"] > 1
            else " (one run each)"
        )
        + "; CPU is the child's user + sys time (median)"
        + ". Every job runs with `"
        + " ".join(f"{k}={v}" for k, v in rep["env"].items())
        + "` (the oneDNN primitive "
        "cache otherwise adds ≈0.3–0.4 GiB over many layer forwards, see OUT_OF_CORE.md); the checkpoint "
        "is read through the page cache before each job, so all start warm. "
        f"Goals (layer-by-layer rows): peak RSS ≤ {GOAL_RSS} × checkpoint, "
        f"time ≤ {GOAL_TIME} × the baseline.",
        "",
        "| job | peak RSS (GiB) | peak / ckpt | wall (s) | time / baseline | CPU (s) "
        "| goals: RSS / time | result |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += [fmt_row(s, ck_bytes, base_s, s["job"].startswith("layerwise")) for s in rep["summary"]]
    base = next((s for s in rep["summary"] if s["job"].startswith("baseline")), None)
    fwd = (
        [r["result"]["forward_s"] for r in rep["runs"].get(base["job"], []) if r.get("result")]
        if base
        else []
    )
    if fwd:
        lines += [
            "",
            f"Baseline in-process forward time: {statistics.median(fwd):.1f} s (median; the rest of its wall "
            "time is interpreter start-up, imports and tokenising).",
        ]
    v = rep["verify"].get("layerwise vs in-memory reap")
    if v and "tensors" in v:
        lines += [
            "",
            f"Layer-by-layer vs in-memory reap outputs: same plan: {v['same_plan']}; "
            f"same keys: {v['same_keys']}; {v['equal']}/{v['tensors']} tensors bitwise equal"
            + (f" (max |diff| {v['max_abs_diff']:.3g})" if v["equal"] != v["tensors"] else "")
            + ".",
        ]
    cg = rep["cgroup"]
    lines += ["", "## Under a memory limit (cgroup v1)", ""]
    if not cg.get("attempted"):
        lines.append("Not run (--no-cgroup).")
    elif "error" in cg:
        lines.append(f"Not run: {cg['error']}.")
    else:
        lines.append(
            f"A memory cgroup with `memory.limit_in_bytes` = {cg['limit_bytes'] / GIB:.2f} GiB "
            f"({cfg['cgroup_fraction']} × the checkpoint), created under this process's own memory cgroup; "
            "the checkpoint's pages were dropped from the page cache first (`posix_fadvise(DONTNEED)`), "
            "so each job reads it cold and its page cache is charged to the group. The limit counts the "
            "group's anonymous memory and the page cache charged to it (clean cache is reclaimed under the "
            "limit, which `failcnt` counts); pages of shared libraries (libtorch) already cached by earlier "
            "processes are charged elsewhere, so a job's RSS can exceed the group's usage."
        )
        lines += [
            "",
            "| job | exit | peak RSS (GiB) | group max usage (GiB) | failcnt | OOM kills | wall (s) "
            "| result |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in cg.get("rows", []):
            s = r["cgroup"]
            res = "completed" if r["rc"] == 0 else r["error"][:160]
            if r["rc"] == -signal.SIGKILL and s["oom_kill"]:
                res = "OOM-killed by the group (SIGKILL)" + r["error"].removeprefix("killed by SIGKILL")[:160]
            if r["rc"] == 0 and r.get("output"):
                res += f", output {r['output']['size_ratio']:.3f}× source" + (
                    "" if r["output"]["ok"] else " — CHECK FAILED"
                )
            if r.get("mode"):
                res += f"; moeprune chose: {r['mode']}"
            lines.append(
                f"| {r['job']} | {r['rc']} | {r['peak_rss_kb'] / 2**20:.2f} | "
                f"{s['max_usage_bytes'] / GIB:.2f} | {s['failcnt']} | {s['oom_kill']} | {r['wall_s']:.1f} "
                f"| {res} |"
            )
    lines += ["", "## Checks", ""]
    for k, val in rep["verify"].items():
        lines.append(f"- {k}: `{json.dumps(val)[:400]}`")
    lines += [f"- {n}" for n in rep["notes"]]
    lines += [
        "",
        "## Machine",
        "",
        f"{m['cpus_usable']} usable CPU cores ({m['cpus']} reported), {m['mem_total_gib']:.1f} GiB RAM, "
        f"kernel {m['kernel']}, Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, safetensors {m['safetensors']}, accelerate {m['accelerate']}. "
        "Load average (1/5/15 min) at start "
        f"{'/'.join(map(str, rep['start']['loadavg']))}, at end {'/'.join(map(str, rep['end']['loadavg']))}; "
        "before each job in memory.json. The cores are shared, so times carry noise from other work.",
        "",
        "Rerun: `python benchmarks/memory.py"
        + (f" --size-gb {cfg['size_gb']}" if cfg["size_gb"] != 4.6 else "")
        + "".join(
            f" --{k.replace('_', '-')} {cfg[k]}"
            for k, d in (("samples", 16), ("seq_len", 128), ("batch_size", 8), ("repeats", 3))
            if cfg[k] != d
        )
        + "`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
