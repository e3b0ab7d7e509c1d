"""Hostile inputs and faults against the `moeprune` CLI: does it refuse cleanly, and does it never lose data?

Every case runs `python -m moeprune ARGV` as a real process (the interpreter and environment of the
caller, so `PYTHONPATH=... python benchmarks/hostile.py` measures that tree), with its working
directory inside its own throwaway case directory under a temporary sandbox. The fixtures (tiny
random MoE checkpoints, calibration text, stats from `moeprune observe`, plans from `moeprune plan`,
a pruned and a MoNE checkpoint) are built once in the sandbox, and each case gets its own copy of the
ones its argv names, so a case that destroys its inputs cannot affect another.

Each case names the issue-11 item it exercises and what it expects: `refuse` (non-zero exit with a
one-line `error:` message), `succeed` (exit 0 and a working output) or `either`. Its result is
measured, never assumed, and classified (worst first):

  hang             the process ran past its timeout
  data lost        a file that existed before the run (and is not a declared output of a successful
                   run) was deleted or modified, or a moeprune temporary (`.NAME.tmp-*`, `.NAME.old-*`,
                   `moeprune-hidden-*`) was left behind
  traceback        "Traceback (most recent call last)" on stdout or stderr
  false success    exit 0 where refusal was expected, or exit 0 with an output that is missing, does
                   not load (and run a forward pass, for models), or fails the case's extra checks
                   (output mode, progress on stdout, a required notice)
  messy refusal    non-zero exit, but the last stderr line is not the one `error:` line, or the message
                   is one the issue calls misleading
  wrongly refused  a `succeed` case that exited non-zero
  refused cleanly  non-zero exit, no traceback, one `error:` line last on stderr, nothing lost
  ok               a `succeed` case that exited 0 with a working output

Outputs: OUT/hostile.md, OUT/hostile.json, OUT/hostile.png (default OUT: benchmarks/results).

    python benchmarks/hostile.py [--out benchmarks/results] [--jobs 2] [--only PATTERN] [--keep]
                                 [--suffix -before]

Read-only directories are made with chmod 0555 and, when running as root (who ignores modes),
`chattr +i`; the full-disk case mounts a tiny tmpfs and is skipped, with the reason, where it cannot.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SMALL = ("--samples", "8", "--seq-len", "32")
PRUNE = ("prune", "mix", "--method", "frequency", "--ratio", "0.25", "--calib", "calib.txt", *SMALL)
# prune with the fixtures one level up, for cases whose cwd is `work/` (a directory of user files)
PRUNE_UP = ("prune", "../mix", "--method", "frequency", "--ratio", "0.25", "--calib", "../calib.txt", *SMALL)
OBSERVE = ("observe", "mix", "--calib", "calib.txt", *SMALL)
# long enough that a signal sent after the start lands mid-run (the `big` fixture, 128 x 256 tokens)
LONG = ("prune", "big", "--method", "reap", "--ratio", "0.25", "--calib", "calib.txt", "--samples", "128",
        "--seq-len", "256")

TRACEBACK = "Traceback (most recent call last)"
TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-|^moeprune-hidden-")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CLASSES = ("ok", "refused cleanly", "messy refusal", "wrongly refused", "false success", "traceback",
           "data lost", "hang")


# ---- setup steps: each takes the case context and changes its copy of the fixtures ----------------------


@dataclasses.dataclass
class Ctx:
    dir: Path  # the case directory
    fixtures: Path
    undo: list  # callables run after the case, whatever happened (chattr -i, umount)

    def copy(self, name: str, dst: str | None = None) -> Path:
        src, target = self.fixtures / name, self.dir / (dst or name)
        if not target.exists():
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, target)
        return target


def write(rel: str, data: bytes | str):
    def step(ctx: Ctx):
        p = ctx.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return step


def user_dir(rel: str):
    """A directory holding the user's own files (not made by moeprune)."""

    def step(ctx: Ctx):
        d = ctx.dir / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "thesis.tex").write_text("\\documentclass{article} % three years of work\n")
        (d / "data.csv").write_text("a,b\n1,2\n")

    return step


def copy(name: str, dst: str):
    return lambda ctx: ctx.copy(name, dst)


def edit_json(rel: str, change: Callable, src: str):
    """Write `change(obj)` of the JSON of fixture `src` to the case's `rel`."""

    def step(ctx: Ctx):
        obj = json.loads((ctx.fixtures / src).read_text())
        (ctx.dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx.dir / rel).write_text(json.dumps(change(obj)))

    return step


def edit_layer0_group0(rel: str, **fields):
    def change(p):
        p["layers"][0]["groups"][0].update(fields)
        return p

    return edit_json(rel, change, src="plan.json")


def latin1_copy(src: str, dst: str):
    """The fixture text with every "e" turned into a Latin-1 byte that is not UTF-8."""
    return lambda ctx: (ctx.dir / dst).write_bytes((ctx.fixtures / src).read_bytes().replace(b"e", b"\xe9"))


def truncate(rel: str, keep: int):
    def step(ctx: Ctx):
        p = ctx.dir / rel
        p.write_bytes(p.read_bytes()[:keep])

    return step


def read_only(rel: str):
    """chmod 0555, and chattr +i when root (root writes through modes); undone after the case."""

    def step(ctx: Ctx):
        p = ctx.dir / rel
        p.mkdir(parents=True, exist_ok=True)
        (p / "keep.txt").write_text("the user's file in a read-only directory\n")
        p.chmod(0o555)
        ctx.undo.append(lambda: p.chmod(0o755))
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(p)], check=True, capture_output=True)
            ctx.undo.append(lambda: subprocess.run(["chattr", "-i", str(p)], capture_output=True))

    return step


def tmpfs(rel: str, size: str):
    def step(ctx: Ctx):
        p = ctx.dir / rel
        p.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(p)], capture_output=True
        )
        if r.returncode != 0:
            raise Skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not root'})")
        ctx.undo.append(lambda: subprocess.run(["umount", "-l", str(p)], capture_output=True))

    return step


def stats_edit(change: Callable, rel: str = "st/stats.json"):
    return edit_json(rel, change, src="st/stats.json")


def drop_shard_tensor(ctx: Ctx):
    """Rewrite one shard of `sharded` without a tensor that the index still names."""
    sh = ctx.copy("sharded")
    index = json.loads((sh / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if ".experts.2." in k)
    shard = sh / index["weight_map"][name]
    script = (
        "import sys; from safetensors.torch import load_file, save_file; "
        "t = load_file(sys.argv[1]); t.pop(sys.argv[2]); save_file(t, sys.argv[1], metadata={'format': 'pt'})"
    )
    subprocess.run([sys.executable, "-c", script, str(shard), name], check=True, capture_output=True)


class Skip(Exception):
    """A case this machine cannot set up; reported with its reason, not counted as tried."""


def skip(reason: str):
    def step(_ctx):
        raise Skip(reason)

    return step


# ---- the cases --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    item: int  # issue 11 item number
    expect: str  # refuse | succeed | either
    argv: tuple
    setup: tuple = ()
    outputs: tuple = ()  # (relative path, kind): kind model | stats | plan | json | dir | stdout-json
    checks: tuple = ()  # extra checks of a success: mode, quiet-stdout, notice:REGEX, stale-reported
    bad_msg: str | None = None  # a refusal whose message matches this is misleading (issue item 15)
    cwd: str = "."
    timeout: float = 180
    signal: tuple | None = None  # (signal name, trigger: "tmpdir" or "stderr:TEXT", delay s, rerun)
    mem_gib: float | None = None


def C(name, item, expect, *argv, **kw) -> Case:
    return Case(name, item, expect, tuple(argv), **kw)


LONG_NAME = "m" * 250
OUT = ("--out", "out")
CASES = (
    # 1: empty and current-directory outputs; --force replaces only what moeprune made
    C("prune --out '' --force", 1, "refuse", *PRUNE_UP, "--out", "", "--force", cwd="work",
      setup=(user_dir("work"),)),
    C("prune --out . --force", 1, "refuse", *PRUNE_UP, "--out", ".", "--force", cwd="work",
      setup=(user_dir("work"),)),
    C("prune --out ''", 1, "refuse", *PRUNE_UP, "--out", "", cwd="work", setup=(user_dir("work"),),
      bad_msg=r"output  already"),
    C("observe --out . --force", 1, "refuse", "observe", "../mix", "--calib", "../calib.txt", *SMALL, "--out",
      ".", "--force", cwd="work", setup=(user_dir("work"),)),
    C("apply --out . --force", 1, "refuse", "apply", "../mix", "../plan.json", "--out", ".", "--force",
      cwd="work", setup=(user_dir("work"),)),
    C("sweep --out . --force", 1, "refuse", "sweep", "../mix", "--method", "frequency", "--ratios", "0.25",
      "--calib", "../calib.txt", "--text", "../calib.txt", *SMALL, "--max-tokens", "128", "--eval-seq-len",
      "32", "--out", ".", "--force", cwd="work", setup=(user_dir("work"),)),
    C("prune --out user-dir --force", 1, "refuse", *PRUNE, "--out", "mine", "--force",
      setup=(user_dir("mine"),)),
    C("prune --out user-file --force", 1, "refuse", *PRUNE, "--out", "notes.txt", "--force"),
    C("observe --out user-dir --force", 1, "refuse", *OBSERVE, "--out", "mine", "--force",
      setup=(user_dir("mine"),)),
    C("apply --out user-dir --force", 1, "refuse", "apply", "mix", "plan.json", "--out", "mine", "--force",
      setup=(user_dir("mine"),)),
    C("prune --out moeprune-made --force", 1, "succeed", *PRUNE, "--out", "pruned", "--force",
      outputs=(("pruned", "model"),)),
    C("prune --out empty-dir --force", 1, "succeed", *PRUNE, "--out", "empty", "--force",
      setup=(lambda ctx: (ctx.dir / "empty").mkdir(),), outputs=(("empty", "model"),)),
    C("apply --out moeprune-made --force", 1, "succeed", "apply", "mix", "plan.json", "--out", "pruned",
      "--force", outputs=(("pruned", "model"),)),
    # 2: no input inside an output, or the reverse, whatever --force says
    C("prune --calib corpus/ --out corpus/ --force", 2, "refuse", "prune", "mix", "--method", "frequency",
      "--ratio", "0.25", "--calib", "corpus/", *SMALL, "--out", "corpus/", "--force"),
    C("apply --stats st/ --out st/ --force", 2, "refuse", "apply", "mix", "mone.json", "--stats", "st/",
      "--out", "st/", "--force"),
    C("apply st/plan.json --out st --force", 2, "refuse", "apply", "mix", "st/plan.json", "--out", "st",
      "--force", setup=(copy("plan.json", "st/plan.json"),)),
    C("prune --out model --force", 2, "refuse", *PRUNE, "--out", "mix", "--force"),
    C("prune --tokenizer tok --out tok --force", 2, "refuse", *PRUNE, "--tokenizer", "tok", "--out", "tok",
      "--force"),
    C("prune --save-stats model", 2, "refuse", *PRUNE, "--save-stats", "mix", *OUT),
    C("prune --save-stats = --out", 2, "refuse", *PRUNE, "--save-stats", "out", *OUT, bad_msg=r"the input"),
    C("prune --offload-dir = --out --force", 2, "refuse", *PRUNE, "--layerwise", "--hidden-memory", "0",
      "--offload-dir", "pruned", "--out", "pruned", "--force"),
    C("observe --calib st/calib.txt --out st --force", 2, "refuse", "observe", "mix", "--calib",
      "st/calib.txt", *SMALL, "--out", "st", "--force", setup=(copy("calib.txt", "st/calib.txt"),)),
    C("analyze stats --out stats --force", 2, "refuse", "analyze", "st", "--model", "mix", "--out", "st",
      "--force"),
    C("sweep --calib corpus --out corpus --force", 2, "refuse", "sweep", "mix", "--method", "frequency",
      "--ratios", "0.25", "--calib", "corpus", "--text", "calib.txt", *SMALL, "--max-tokens", "128",
      "--eval-seq-len", "32", "--out", "corpus", "--force"),
    # 3: plan --out and eval --json never write into an input
    C("plan --model M --out M/config.json --force", 3, "refuse", "plan", "st", "--method", "frequency",
      "--ratio", "0.25", "--model", "mix", "--out", "mix/config.json", "--force"),
    C("plan --out stats/stats.json --force", 3, "refuse", "plan", "st", "--method", "frequency", "--ratio",
      "0.25", "--out", "st/stats.json", "--force"),
    C("eval M --json M/model.safetensors --force", 3, "refuse", "eval", "mix", "--text", "calib.txt",
      "--max-tokens", "128", "--seq-len", "32", "--json", "mix/model.safetensors", "--force"),
    C("eval --text T --json T --force", 3, "refuse", "eval", "mix", "--text", "calib.txt", "--max-tokens",
      "128", "--seq-len", "32", "--json", "calib.txt", "--force"),
    C("eval A B --json B/README.md --force", 3, "refuse", "eval", "mix", "pruned", "--text", "calib.txt",
      "--max-tokens", "128", "--seq-len", "32", "--json", "pruned/README.md", "--force"),
    C("plan --out p.json", 3, "succeed", "plan", "st", "--method", "frequency", "--ratio", "0.25", "--out",
      "p.json", outputs=(("p.json", "plan"),)),
    C("plan --force over own plan", 3, "succeed", "plan", "st", "--method", "reap", "--ratio", "0.25",
      "--out", "plan.json", "--force", outputs=(("plan.json", "plan"),)),
    C("eval --json r.json", 3, "succeed", "eval", "mix", "pruned", "--text", "calib.txt", "--max-tokens",
      "128", "--seq-len", "32", "--json", "r.json", outputs=(("r.json", "json"),), checks=("quiet-stdout",)),
    # 4: stats and plans carry the model's fingerprint
    C("apply MoNE --stats of hidden-32 model", 4, "refuse", "apply", "mix", "mone.json", "--stats", "st32",
      *OUT),
    C("plan stats_of_qwen2_moe --model mixtral", 4, "refuse", "plan", "stq", "--method", "frequency",
      "--ratio", "0.25", "--model", "mix", "--out", "p.json"),
    C("plan stats of hidden-32 --model hidden-64", 4, "refuse", "plan", "st32", "--method", "naee", "--ratio",
      "0.25", "--model", "mix", "--out", "p.json"),
    C("plan stats hidden-64 --model hidden-32", 4, "refuse", "plan", "st", "--method", "dek", "--ratio",
      "0.25", "--model", "mix32", "--out", "p.json"),
    C("apply plan of hidden-32 model", 4, "refuse", "apply", "mix", "plan32.json", *OUT),
    C("apply plan of qwen2_moe to mixtral", 4, "refuse", "apply", "mix", "planq.json", *OUT),
    C("apply plan of 8 experts to 4-expert model", 4, "refuse", "apply", "mix4", "plan.json", *OUT),
    C("apply MoNE plan --stats", 4, "succeed", "apply", "mix", "mone.json", "--stats", "st", *OUT,
      outputs=(("out", "model"),), checks=("mode",)),
    C("apply plan", 4, "succeed", "apply", "mix", "plan.json", *OUT, outputs=(("out", "model"),),
      checks=("mode",)),
    # 5: every numeric option checked up front
    C("prune --batch-size -1", 5, "refuse", *PRUNE, "--batch-size", "-1", *OUT),
    C("prune --batch-size 0", 5, "refuse", *PRUNE, "--batch-size", "0", *OUT),
    C("observe --batch-size -1", 5, "refuse", *OBSERVE, "--batch-size", "-1", *OUT),
    C("prune --probe-size -1", 5, "refuse", *PRUNE, "--probe-size", "-1", *OUT),
    C("prune --seq-len 513 (> max positions)", 5, "refuse", "prune", "mix", "--method", "frequency",
      "--ratio", "0.25", "--calib", "calib.txt", "--samples", "2", "--seq-len", "513", *OUT),
    C("observe --seq-len 100000", 5, "refuse", "observe", "mix", "--calib", "calib.txt", "--samples", "2",
      "--seq-len", "100000", *OUT),
    C("prune --hidden-memory -1", 5, "refuse", *PRUNE, "--layerwise", "--hidden-memory", "-1", *OUT),
    C("prune --hidden-memory nan", 5, "refuse", *PRUNE, "--layerwise", "--hidden-memory", "nan", *OUT),
    C("prune --ratio -0.5", 5, "refuse", "prune", "mix", "--method", "frequency", "--ratio", "-0.5",
      "--calib", "calib.txt", *SMALL, *OUT),
    C("prune --ratio nan", 5, "refuse", "prune", "mix", "--method", "frequency", "--ratio", "nan", "--calib",
      "calib.txt", *SMALL, *OUT),
    C("eval --batch-size 0", 5, "refuse", "eval", "mix", "--text", "calib.txt", "--max-tokens", "128",
      "--seq-len", "32", "--batch-size", "0"),
    C("eval --seq-len 100000", 5, "refuse", "eval", "mix", "--text", "calib.txt", "--max-tokens", "128",
      "--seq-len", "100000"),
    C("sweep --ratios 0.25,abc", 5, "refuse", "sweep", "mix", "--method", "frequency", "--ratios", "0.25,abc",
      "--calib", "calib.txt", *SMALL, "--out", "sw"),
    # 6 and 7: interrupts and kills; no hidden temporary directory survives
    C("SIGINT during calibration", 6, "refuse", *LONG, "--in-memory", *OUT, signal=("SIGINT",
      "stderr:in memory", 0.5, False)),
    C("SIGINT during layer-by-layer write", 6, "refuse", *LONG, "--layerwise", *OUT, signal=("SIGINT",
      "tmpdir", 0.5, False)),
    C("SIGINT during observe", 6, "refuse", "observe", "big", "--calib", "calib.txt", "--samples", "128",
      "--seq-len", "256", *OUT, signal=("SIGINT", "stderr:in memory", 0.5, False)),
    C("SIGTERM during layer-by-layer write", 7, "refuse", *LONG, "--layerwise", *OUT, signal=("SIGTERM",
      "tmpdir", 0.5, False)),
    C("SIGTERM during calibration", 7, "refuse", *LONG, "--in-memory", *OUT, signal=("SIGTERM",
      "stderr:in memory", 0.5, False)),
    C("SIGKILL mid-write, then run again", 7, "succeed", *LONG, "--layerwise", *OUT, signal=("SIGKILL",
      "tmpdir", 0.5, True), outputs=(("out", "model"),), checks=("stale-reported",), timeout=300),
    # 8: garbage is refused, not silently used
    C("prune NaN weights", 8, "either", "prune", "nan", "--method", "reap", "--ratio", "0.25", "--calib",
      "calib.txt", *SMALL, *OUT, outputs=(("out", "model"),), checks=(r"notice:(?i)nan|not finite",)),
    C("mone -o novice=maybe", 8, "refuse", "plan", "st", "--method", "mone", "--ratio", "0.25", "-o",
      "novice=maybe", "--out", "p.json"),
    C("mone -o novice=no", 8, "succeed", "plan", "st", "--method", "mone", "--ratio", "0.25", "-o",
      "novice=no", "--out", "p.json", outputs=(("p.json", "plan"),)),
    C("plan negative coefficients", 8, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", coeffs=[-1.0]),)),
    C("plan coefficients not summing to 1", 8, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", coeffs=[0.3]),)),
    C("plan merge coefficients 0.2+0.2", 8, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_json("bad.json", lambda p: _merge_first_two(p, [0.2, 0.2]), src="plan.json"),)),
    C("plan merge 0.2+0.2 with normalise=false", 8, "either", "apply", "mix", "bad.json", *OUT,
      setup=(edit_json("bad.json", lambda p: {**_merge_first_two(p, [0.2, 0.2]), "normalise": False},
      src="plan.json"),), outputs=(("out", "model"),)),
    C('plan flatten_groups: "yes"', 8, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_json("bad.json", lambda p: {**p, "flatten_groups": "yes"}, src="plan.json"),)),
    C("--calib binary file", 8, "refuse", *PRUNE[:-6], "--calib", "blob.bin", *SMALL, *OUT,
      setup=(write("blob.bin", os.urandom(1 << 18)),)),
    C("--calib NUL-filled file", 8, "refuse", *PRUNE[:-6], "--calib", "zeros.txt", *SMALL, *OUT,
      setup=(write("zeros.txt", bytes(1 << 18)),)),
    C("--calib /dev/zero", 8, "refuse", *PRUNE[:-6], "--calib", "/dev/zero", *SMALL, *OUT, timeout=90,
      mem_gib=6),
    # 9: usage errors are one line, exit 2
    C("unknown flag", 9, "refuse", *PRUNE, *OUT, "--bogus-flag"),
    C("missing --out", 9, "refuse", *PRUNE),
    C("missing --method", 9, "refuse", "prune", "mix", "--calib", "calib.txt", *OUT),
    C("--ratio abc", 9, "refuse", "prune", "mix", "--method", "frequency", "--ratio", "abc", "--calib",
      "calib.txt", *OUT),
    C("misspelt command", 9, "refuse", "prnue", "mix", "--method", "frequency", *OUT),
    C("option without value", 9, "refuse", *PRUNE, "--out"),
    C("--help", 9, "succeed", "--help", outputs=(("", "stdout:Usage"),)),
    C("prune --help", 9, "succeed", "prune", "--help", outputs=(("", "stdout:--method"),)),
    C("inspect", 9, "succeed", "inspect", "mix", outputs=(("", "stdout:mixtral"),)),
    C("inspect --json", 9, "succeed", "inspect", "mix", "--json", outputs=(("", "stdout-json"),)),
    # 10: output locations checked before any work; remaining OS errors are one line
    C("prune --out read-only/out", 10, "refuse", *PRUNE, "--out", "ro/out", setup=(read_only("ro"),)),
    C("apply --out read-only/out", 10, "refuse", "apply", "mix", "plan.json", "--out", "ro/out",
      setup=(read_only("ro"),)),
    C("plan --out read-only/p.json", 10, "refuse", "plan", "st", "--method", "frequency", "--ratio", "0.25",
      "--out", "ro/p.json", setup=(read_only("ro"),)),
    C("eval --json read-only/r.json", 10, "refuse", "eval", "mix", "--text", "calib.txt", "--max-tokens",
      "128", "--seq-len", "32", "--json", "ro/r.json", setup=(read_only("ro"),)),
    C("prune --force onto read-only moeprune-made dir", 10, "refuse", *PRUNE, "--out", "ro/pruned", "--force",
      setup=(lambda ctx: ctx.copy("pruned", "ro/pruned"), read_only("ro"))),
    C("prune --out parent-is-a-file/out", 10, "refuse", *PRUNE, "--out", "notes.txt/out"),
    C("prune --out 250-char name (temp sibling too long)", 10, "either", *PRUNE, "--out", LONG_NAME,
      outputs=((LONG_NAME, "model"),)),
    C("prune --out 300-char name", 10, "refuse", *PRUNE, "--out", "n" * 300),
    C("prune --out full disk", 10, "refuse", *PRUNE, "--out", "full/out", setup=(tmpfs("full", "512k"),)),
    C("plan --out missing-dir/p.json", 10, "refuse", "plan", "st", "--method", "frequency", "--ratio", "0.25",
      "--out", "nowhere/p.json"),
    C("plan --out onto a directory --force", 10, "refuse", "plan", "st", "--method", "frequency", "--ratio",
      "0.25", "--out", "mine", "--force", setup=(user_dir("mine"),)),
    # 11: damaged stats directories
    C("stats.json invalid JSON", 11, "refuse", "plan", "st", "--method", "frequency", "--ratio", "0.25",
      "--out", "p.json", setup=(write("st/stats.json", "{not json"),)),
    C("stats.json a JSON list", 11, "refuse", "plan", "st", "--method", "frequency", "--ratio", "0.25",
      "--out", "p.json", setup=(write("st/stats.json", "[1, 2, 3]"),)),
    C("stats.json without layers", 11, "refuse", "plan", "st", "--method", "frequency", "--ratio", "0.25",
      "--out", "p.json", setup=(stats_edit(lambda m: {k: v for k, v in m.items() if k != "layers"}),)),
    C("stats.json layer listed but missing", 11, "refuse", "plan", "st", "--method", "frequency", "--ratio",
      "0.25", "--out", "p.json", setup=(stats_edit(lambda m: {**m, "layers": [*m["layers"], 7]}),)),
    C("stats.json num_experts a string", 11, "refuse", "plan", "st", "--method", "frequency", "--ratio",
      "0.25", "--out", "p.json", setup=(stats_edit(lambda m: {**m, "model": {**m["model"],
      "num_experts": "eight"}}),)),
    C("stats.safetensors truncated", 11, "refuse", "plan", "st", "--method", "frequency", "--ratio", "0.25",
      "--out", "p.json", setup=(lambda ctx: ctx.copy("st"), truncate("st/stats.safetensors", 5000))),
    C("stats.safetensors garbage", 11, "refuse", "plan", "st", "--method", "reap", "--ratio", "0.25", "--out",
      "p.json", setup=(lambda ctx: ctx.copy("st"), write("st/stats.safetensors", os.urandom(4096)))),
    C("apply --stats truncated", 11, "refuse", "apply", "mix", "mone.json", "--stats", "st", *OUT,
      setup=(lambda ctx: ctx.copy("st"), truncate("st/stats.safetensors", 5000))),
    C("plan stats dir is a model", 11, "refuse", "plan", "mix", "--method", "frequency", "--ratio", "0.25",
      "--out", "p.json"),
    # 12: wrongly typed plan fields, checked against a schema when loaded
    C("plan string coefficients", 12, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", coeffs=["1.0"]),)),
    C("plan string members", 12, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", members=["1"]),)),
    C("plan float members", 12, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", members=[1.5]),)),
    C("plan string permutations", 12, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", perms="identity"),)),
    C("plan top-level list", 12, "refuse", "apply", "mix", "bad.json", *OUT, setup=(write("bad.json",
      "[]"),)),
    C("plan layers a string", 12, "refuse", "apply", "mix", "bad.json", *OUT, setup=(edit_json("bad.json",
      lambda p: {**p, "layers": "all"}, src="plan.json"),)),
    C("plan layer without groups", 12, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_json("bad.json", lambda p: _layer0(p, lambda lp: lp.pop("groups")), src="plan.json"),)),
    C("plan novices a string", 12, "refuse", "apply", "mix", "bad.json", "--stats", "st", *OUT,
      setup=(edit_json("bad.json", lambda p: _layer0(p, lambda lp: lp.update(novices="0 3")),
      src="mone.json"),)),
    C("plan member out of range", 12, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", members=[99]),)),
    C("plan member twice", 12, "refuse", "apply", "mix", "bad.json", *OUT, setup=(edit_json("bad.json",
      lambda p: _layer0(p, lambda lp: lp["groups"][1].update(members=lp["groups"][0]["members"])),
      src="plan.json"),)),
    # 13: other tracebacks
    C("--calib .jsonl with non-UTF-8 bytes", 13, "refuse", *PRUNE[:-6], "--calib", "bad.jsonl", *SMALL, *OUT,
      setup=(write("bad.jsonl", b'{"text": "caf\xe9 cr\xe8me"}\n' * 2000),)),
    C("--calib .txt with non-UTF-8 bytes", 13, "either", *PRUNE[:-6], "--calib", "latin1.txt", *SMALL, *OUT,
      setup=(latin1_copy("calib.txt", "latin1.txt"),), outputs=(("out", "model"),),
      checks=(r"notice:(?i)utf-?8|decod|replac",)),
    C("--calib-template '{text[x]}'", 13, "refuse", *PRUNE[:-6], "--calib", "calib.jsonl", "--calib-template",
      "{text[x]}", *SMALL, *OUT),
    C("--calib-template '{'", 13, "refuse", *PRUNE[:-6], "--calib", "calib.jsonl", "--calib-template", "{",
      *SMALL, *OUT),
    C("--calib-template", 13, "succeed", *PRUNE[:-6], "--calib", "calib.jsonl", "--calib-template",
      "Q: {question} A: {text}", *SMALL, *OUT, outputs=(("out", "model"),)),
    C("--tokenizer ids beyond vocabulary", 13, "refuse", *PRUNE, "--tokenizer", "bigtok", *OUT),
    C("--tokenizer missing dir", 15, "refuse", *PRUNE, "--tokenizer", "./no-tokenizer", *OUT,
      bad_msg=r"(?i)repo.?id|huggingface\.co"),
    C("--device tpu", 13, "refuse", *PRUNE, "--device", "tpu", *OUT),
    C("--device meta", 13, "refuse", *PRUNE, "--device", "meta", *OUT),
    C("dek -o learn_lr=nan", 13, "refuse", "plan", "st", "--method", "dek", "--ratio", "0.25", "-o",
      "coefficients=learned", "-o", "learn_lr=nan", "--model", "mix", "--out", "p.json"),
    C("--offload-dir is a file", 13, "refuse", *PRUNE, "--layerwise", "--hidden-memory", "0", "--offload-dir",
      "notes.txt", *OUT),
    C("--offload-dir read-only", 13, "refuse", *PRUNE, "--layerwise", "--hidden-memory", "0", "--offload-dir",
      "ro", *OUT, setup=(read_only("ro"),)),
    C("layerwise: tensor in index missing from shard", 13, "refuse", "prune", "sharded", "--method",
      "frequency", "--ratio", "0.25", "--calib", "calib.txt", *SMALL, "--layerwise", *OUT,
      setup=(drop_shard_tensor,)),
    C("layerwise sharded prune", 13, "succeed", "prune", "sharded", "--method", "reap", "--ratio", "0.25",
      "--calib", "calib.txt", *SMALL, "--layerwise", *OUT, outputs=(("out", "model"),), checks=("mode",)),
    C("demo TestbedQualityError", 13, "refuse", "demo",
      setup=(skip("demo trains the offline testbed (10-15 min)"),)),
    # 14: method options and plan/model mismatches found before the expensive pass
    C("uncurl -o clustering=bogus", 14, "refuse", "prune", "mix", "--method", "uncurl", "--ratio", "0.25",
      "--calib", "calib.txt", *SMALL, "-o", "clustering=bogus", *OUT),
    C("naee -o max_exhaustive=-1", 14, "refuse", "prune", "mix", "--method", "naee", "--ratio", "0.25",
      "--calib", "calib.txt", *SMALL, "-o", "max_exhaustive=-1", *OUT),
    C("mone -o ranking=bogus", 14, "refuse", "plan", "st", "--method", "mone", "--ratio", "0.25", "-o",
      "ranking=bogus", "--out", "p.json"),
    C("unknown -o key", 14, "refuse", *PRUNE, "-o", "nosuch=1", *OUT),
    C("apply plan missing a layer", 14, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_json("bad.json", lambda p: {**p, "layers": p["layers"][1:]}, src="plan.json"),)),
    C("apply plan with a layer twice", 14, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_json("bad.json", lambda p: {**p, "layers": [p["layers"][0], *p["layers"]]},
      src="plan.json"),)),
    C("apply plan wrong permutation width", 14, "refuse", "apply", "mix", "bad.json", *OUT,
      setup=(edit_layer0_group0("bad.json", perms=[[0, 1, 2]]),)),
    C("plan --method needing weights without --model", 14, "refuse", "plan", "st", "--method", "naee",
      "--ratio", "0.25", "--out", "p.json"),
    # 15: messages that say the right thing
    C("--experts 9 above E=8", 15, "refuse", "prune", "mix", "--method", "frequency", "--experts", "9",
      "--calib", "calib.txt", *SMALL, *OUT, bad_msg=r"<= -"),
    C("model with top-k 9 above E=8", 15, "refuse", *PRUNE, *OUT, bad_msg=r"<= -",
      setup=(edit_json("mix/config.json", lambda c: {**c, "num_experts_per_tok": 9},
                       src="mix/config.json"),)),
    C("inspect M/config.json", 15, "refuse", "inspect", "mix/config.json", bad_msg=r"has no config\.json"),
    C("stats of 8 experts, model of 4", 15, "refuse", "plan", "st", "--method", "naee", "--ratio", "0.25",
      "--model", "mix4", "--out", "p.json"),
    C("-o seed (valid key, no '=')", 15, "refuse", "plan", "st", "--method", "random", "--experts", "6", "-o",
      "seed", "--out", "p.json", bad_msg=r"(?i)unknown|KEY in \[.*'seed'"),
    C("eval --tasks nosuchtask", 15, "refuse", "eval", "mix", "--tasks", "nosuchtask", "--limit", "2",
      bad_msg=r"above report"),
    # 16 and 17: output permissions; results on stdout, progress on stderr
    C("prune output mode", 16, "succeed", *PRUNE, *OUT, outputs=(("out", "model"),), checks=("mode",
      "quiet-stdout")),
    C("observe output mode", 16, "succeed", *OBSERVE, "--out", "st2", outputs=(("st2", "stats"),),
      checks=("mode", "quiet-stdout")),
    C("export-stock output mode", 16, "succeed", "export-stock", "monepruned", "--out", "stock",
      outputs=(("stock", "model"),), checks=("mode",)),
    C("prune --layerwise output mode", 16, "succeed", *PRUNE, "--layerwise", *OUT, outputs=(("out",
      "model"),), checks=("mode", "quiet-stdout")),
    C("prune qwen2_moe --save-stats", 17, "succeed", "prune", "qwen", "--method", "reap", "--ratio", "0.25",
      "--calib", "calib.txt", *SMALL, "--save-stats", "qst", *OUT, outputs=(("out", "model"), ("qst",
      "stats")), checks=("mode", "quiet-stdout")),
    C("sweep", 17, "succeed", "sweep", "mix", "--method", "frequency", "--ratios", "0.25", "--calib",
      "calib.txt", "--text", "calib.txt", *SMALL, "--max-tokens", "128", "--eval-seq-len", "32", "--out",
      "sw", outputs=(("sw", "dir"),), checks=("quiet-stdout",)),
    C("eval perplexity", 17, "succeed", "eval", "mix", "--text", "calib.txt", "--max-tokens", "128",
      "--seq-len", "32", outputs=(("", "stdout:(?i)perplexity|ppl"),), checks=("quiet-stdout",)),
    C("prune uncurl merge", 17, "succeed", "prune", "mix", "--method", "uncurl", "--ratio", "0.25", "--calib",
      "calib.txt", *SMALL, *OUT, outputs=(("out", "model"),)),
)


def _layer0(plan, change):
    change(plan["layers"][0])
    return plan


def _merge_first_two(plan, coeffs):
    """Layer 0's first two kept experts merged with `coeffs`, and a dropped one kept: the count stays."""
    lp = plan["layers"][0]
    a, b = lp["groups"][:2]
    kept = {m for g in lp["groups"] for m in g["members"]}
    spare = min(e for e in range(lp["num_experts_in"]) if e not in kept)
    merged = {"members": a["members"] + b["members"], "coeffs": coeffs}
    lp["groups"] = [merged, {"members": [spare], "coeffs": [1.0]}, *lp["groups"][2:]]
    return plan


# ---- fixtures (built in a child process: the harness itself never imports torch) --------------------------

FIXTURE_CODE = r"""
import json, os, shutil, sys, sysconfig
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer

root = Path(sys.argv[1])
save_tiny_checkpoint("mixtral", root / "mix", seed=0)
save_tiny_checkpoint("qwen2_moe", root / "qwen", seed=0)
save_tiny_checkpoint("mixtral", root / "mix32", seed=0, hidden_size=32)
save_tiny_checkpoint("mixtral", root / "mix4", seed=0, num_experts=4)
# large enough that a 128 x 256-token pass takes seconds, so signals land mid-run
save_tiny_checkpoint("mixtral", root / "big", seed=0, intermediate_size=1024, num_hidden_layers=6)
tiny_model("mixtral", seed=0).save_pretrained(str(root / "sharded"), max_shard_size="400KB")
tiny_tokenizer().save_pretrained(str(root / "sharded"))
tiny_tokenizer().save_pretrained(str(root / "tok"))
for name, value in (("nan", float("nan")), ("inf", float("inf"))):
    shutil.copytree(root / "mix", root / name)
    w = load_file(str(root / name / "model.safetensors"))
    for k in w:
        if ".layers.0." in k and ".experts.3." in k:
            w[k] = torch.full_like(w[k], value)
    save_file(w, str(root / name / "model.safetensors"), metadata={"format": "pt"})
stdlib = Path(sysconfig.get_paths()["stdlib"])
names = ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py")  # as tests/helpers.py calibration_text()
texts = [(stdlib / n).read_text(encoding="utf-8") for n in names]
(root / "calib.txt").write_text("\n".join(texts), encoding="utf-8")
(root / "corpus").mkdir()
for i, t in enumerate(texts):
    (root / "corpus" / f"{'abcd'[i]}.txt").write_text(t, encoding="utf-8")
with open(root / "calib.jsonl", "w", encoding="utf-8") as f:
    for para in "\n".join(texts).split("\n\n"):
        f.write(json.dumps({"text": para, "question": para[:40]}) + "\n")
# a tokenizer whose added tokens (common words of the text) get ids beyond the model's 1024
tok = tiny_tokenizer()
words = sorted({w for w in "\n".join(texts).split() if w.isidentifier()})
tok.add_tokens([f"<pad{i}>" for i in range(600)] + words[:800])
tok.save_pretrained(str(root / "bigtok"))

os.chdir(root)
from moeprune.cli import main
for argv in json.loads(sys.argv[2]):
    if main(argv) != 0:
        sys.exit(f"fixture command failed: moeprune {' '.join(argv)}")
"""

VERIFY_CODE = r"""
import json, math, sys
from pathlib import Path
import torch, transformers
transformers.utils.logging.set_verbosity_error()
results = {}
for key, path, kind in json.load(open(sys.argv[1])):
    try:
        p = Path(path)
        if kind == "model":
            raw = json.loads((p / "config.json").read_text())
            if "moeprune_novice" in raw:
                import moeprune
                model = moeprune.from_pretrained(p)
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(str(p)).eval()
            ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            assert torch.isfinite(logits).all(), "non-finite logits"
        elif kind == "stats":
            from moeprune.observe import Stats
            assert Stats.load(p).layers, "no layers"
        elif kind == "plan":
            from moeprune.plan import Plan
            assert Plan.load(p).layers, "no layers"
        elif kind == "json":
            json.loads(p.read_text())
        elif kind == "dir":
            assert p.is_dir() and any(p.iterdir()), "missing or empty"
        results[key] = None
    except BaseException as e:
        first = str(e).splitlines()[0] if str(e) else ""
        results[key] = f"{kind} {p.name}: {type(e).__name__}: {first}"[:200]
print(json.dumps(results))
"""


# The CLI's own commands make the stats, plans and moeprune-made outputs, in the fixture child through
# moeprune.cli.main (one interpreter start instead of nine)
FIXTURE_COMMANDS = (
    ("observe", "mix", "--calib", "calib.txt", *SMALL, "--out", "st"),
    ("observe", "mix32", "--calib", "calib.txt", *SMALL, "--out", "st32"),
    ("observe", "qwen", "--calib", "calib.txt", *SMALL, "--out", "stq"),
    (*PRUNE, "--out", "pruned"),
    ("plan", "st", "--method", "frequency", "--ratio", "0.25", "--out", "plan.json"),
    ("plan", "st", "--method", "mone", "--ratio", "0.25", "--out", "mone.json"),
    ("plan", "st32", "--method", "frequency", "--ratio", "0.25", "--out", "plan32.json"),
    ("plan", "stq", "--method", "frequency", "--ratio", "0.25", "--out", "planq.json"),
    ("apply", "mix", "mone.json", "--stats", "st", "--out", "monepruned"),
)


def build_fixtures(fixtures: Path, env: dict) -> None:
    fixtures.mkdir(parents=True)
    cmd = [sys.executable, "-c", FIXTURE_CODE, str(fixtures), json.dumps(FIXTURE_COMMANDS)]
    r = subprocess.run(cmd, cwd=fixtures, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"building the fixtures failed (exit {r.returncode}):\n{r.stderr[-3000:]}")


# ---- running one case -------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files) or '<dir>'; moeprune's temporaries are listed apart, not hashed."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames:
            out[str((d / name).relative_to(root))] = "<dir>"
        for name in filenames:
            p = d / name
            if p.is_symlink() or not p.is_file():
                out[str(p.relative_to(root))] = "<special>"
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


def leftovers(case_dir: Path) -> list[str]:
    """moeprune temporaries in the case directory, its private TMPDIR, or next to it (for --out .)."""
    found = [str(p.relative_to(case_dir)) for p in case_dir.rglob("*") if TEMP_NAME.match(p.name)]
    found += [f"../{p.name}" for p in case_dir.parent.iterdir() if p.name.startswith(f".{case_dir.name}.")]
    return sorted(found)


def run_process(case: Case, case_dir: Path, env: dict) -> dict:
    """Run the case's command (and, for signal cases, the signal and the rerun); exit code and output."""
    cwd = case_dir / case.cwd
    argv = [a.replace("{cwd}", str(cwd)) for a in case.argv]
    cmd = [sys.executable, "-m", "moeprune", *argv]

    started = time.monotonic()
    # a new session so that a signal reaches the whole command, as Ctrl-C does, and a hang can be killed
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    if case.mem_gib:  # /dev/zero and friends: fail on memory rather than take the shared machine down
        size = int(case.mem_gib * 2**30)
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (size, size))
    chunks = {"out": [], "err": []}
    readers = [
        threading.Thread(target=_drain, args=(s, chunks[k]), daemon=True)
        for k, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for t in readers:
        t.start()
    sent, mark = _send_signal(case, proc, case_dir, chunks, started) if case.signal else (None, 0)
    try:
        code = proc.wait(timeout=max(1.0, case.timeout - (time.monotonic() - started)))
        hang = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code, hang = proc.wait(), True
    for t in readers:
        t.join(10)
    result = {
        "exit": code,
        "hang": hang,
        "seconds": round(time.monotonic() - started, 1),
        "stdout": b"".join(chunks["out"]).decode(errors="replace"),
        "stderr": b"".join(chunks["err"]).decode(errors="replace"),
        "signal_sent": sent,
        # what the command said after the signal: its own message, if it handled the signal
        "stderr_after_signal": b"".join(chunks["err"])[mark:].decode(errors="replace") if sent else "",
    }
    if case.signal and case.signal[3] and not hang:
        # SIGKILL leaves its temporary behind on purpose; the second, plain run must clean it and say so
        result["stale_before_rerun"] = leftovers(case_dir)
        try:
            r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=case.timeout,
                               start_new_session=True)
        except subprocess.TimeoutExpired:
            return {**result, "hang": True}
        result.update(
            exit=r.returncode,
            stdout=r.stdout.decode(errors="replace"),
            stderr=r.stderr.decode(errors="replace"),
            first_exit=code,
        )
    return result


def _drain(stream, sink: list) -> None:
    for chunk in iter(lambda: stream.read1(4096), b""):
        sink.append(chunk)


def _send_signal(case: Case, proc, case_dir: Path, chunks: dict, started: float) -> tuple[str | None, int]:
    """Wait for the trigger (a temporary output directory, or a notice on stderr), then signal the group.

    -> (what was sent when, bytes of stderr before it), or (None, 0) if the run ended first.
    """
    name, trigger, delay, _ = case.signal
    while proc.poll() is None and time.monotonic() - started < case.timeout:
        if trigger == "tmpdir":
            hit = any(p.name.startswith(".out.tmp-") for p in (case_dir / case.cwd).iterdir())
        else:
            hit = trigger.split(":", 1)[1] in b"".join(chunks["err"]).decode(errors="replace")
        if hit:
            time.sleep(delay)
            if proc.poll() is not None:
                return None, 0
            mark = sum(map(len, chunks["err"]))
            os.killpg(proc.pid, getattr(signal, name))
            return f"{name} at {time.monotonic() - started:.1f} s", mark
        time.sleep(0.02)
    return None, 0


def run_case(index: int, case: Case, sandbox: Path, env: dict) -> dict:
    case_dir = sandbox / "cases" / f"{index:03d}"
    case_dir.mkdir(parents=True)
    ctx = Ctx(case_dir, sandbox / "fixtures", [])
    record = {
        "name": case.name,
        "item": case.item,
        "expect": case.expect,
        "argv": list(case.argv),
        "cwd": case.cwd,
        "dir": str(case_dir),
    }
    try:
        (case_dir / "notes.txt").write_text("the user's own notes, next to the inputs\n")
        fixtures = set(os.listdir(ctx.fixtures))
        for token in case.argv:
            for piece in re.split(r"[=,]", token):
                head = next((part for part in Path(piece).parts if part not in ("..", ".")), "")
                if head in fixtures:
                    ctx.copy(head)
        for step in case.setup:
            step(ctx)
        (case_dir / "_tmp").mkdir(exist_ok=True)
        before = snapshot(case_dir)
        case_env = {**env, "TMPDIR": str(case_dir / "_tmp")}
        record.update(run_process(case, case_dir, case_env))
        record["after"] = snapshot(case_dir)
        record["before"] = before
        record["leftovers"] = leftovers(case_dir)
        if case.signal and not record["signal_sent"]:
            record["skipped"] = "signal not delivered: the run ended before its trigger"
    except Skip as e:
        record["skipped"] = str(e)
    except Exception as e:  # a fault of this harness must not end the run or pass for a result
        record["skipped"] = f"harness error: {type(e).__name__}: {e}"
    finally:
        for undo in reversed(ctx.undo):
            undo()
    return record


# ---- classification ---------------------------------------------------------------------------------------


def lost_files(record: dict, case: Case, succeeded: bool) -> list[str]:
    """Files that existed before and are gone or changed; a success may replace its declared outputs."""
    outputs = [o for o, kind in case.outputs if o and not kind.startswith("stdout")] if succeeded else []
    after, lost = record["after"], []
    for rel, digest in record["before"].items():
        if rel.startswith("_tmp") or any(rel == o or rel.startswith(o + "/") for o in outputs):
            continue
        if after.get(rel) != digest:
            lost.append(rel + (" (deleted)" if rel not in after else " (modified)"))
    return lost


def classify(record: dict, case: Case, verified: dict, umask: int) -> tuple[str, str]:
    """(class, reason) of one result; see the module docstring for the order."""
    if record.get("hang"):
        return "hang", f"no exit after {case.timeout:.0f} s"
    code, out, err = record["exit"], record["stdout"], ANSI.sub("", record["stderr"])
    ok_exit = code == 0
    lost = lost_files(record, case, ok_exit and case.expect != "refuse")
    if lost or record["leftovers"]:
        return "data lost", "; ".join(
            [*lost[:4], *(["..."] if len(lost) > 4 else []), *[f"left {p}" for p in record["leftovers"][:3]]]
        )
    if TRACEBACK in err or TRACEBACK in out:
        tail = [ln for ln in err.splitlines() if ln.strip()] or [ln for ln in out.splitlines() if ln.strip()]
        return "traceback", tail[-1].strip() if tail else ""
    if ok_exit:
        if case.expect == "refuse":
            return "false success", "exit 0 where a refusal was expected"
        problems = [verified.get(f"{record['index']}:{o}") for o, _ in case.outputs]
        problems += _check_success(record, case, out, err, umask)
        problems = [p for p in problems if p]
        return ("false success", "; ".join(problems)) if problems else ("ok", _last_line(out))
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if case.expect == "succeed":
        return "wrongly refused", last or f"exit {code} with no message"
    if case.signal:
        said = [ln.strip() for ln in ANSI.sub("", record["stderr_after_signal"]).splitlines() if ln.strip()]
        if code < 0:
            return "messy refusal", f"killed by {signal.Signals(-code).name}: not handled, no message"
        if len(said) != 1:
            tail = said[-1] if said else ""
            return "messy refusal", f"exit {code}, {len(said)} lines after the signal: {tail}"
        return "refused cleanly", said[0]
    errors = [ln for ln in lines if ln.lower().startswith("error:")]
    if not last.lower().startswith("error:") or len(errors) != 1:
        return "messy refusal", f"not one error: line last ({len(lines)} stderr lines): {last}"
    if case.bad_msg and re.search(case.bad_msg, last):
        return "messy refusal", f"misleading: {last}"
    return "refused cleanly", last


def _check_success(record: dict, case: Case, out: str, err: str, umask: int) -> list[str]:
    problems = []
    for _rel, kind in case.outputs:
        if kind == "stdout-json":
            try:
                json.loads(out)
            except ValueError:
                problems.append("stdout is not JSON")
        elif kind.startswith("stdout:") and not re.search(kind.split(":", 1)[1], out):
            problems.append(f"stdout lacks {kind.split(':', 1)[1]!r}")
    for check in case.checks:
        if check == "mode":
            for rel, kind in case.outputs:
                if kind.startswith("stdout"):
                    continue
                p = Path(record["dir"]) / case.cwd / rel
                want = 0o777 & ~umask
                if p.is_dir() and (p.stat().st_mode & 0o777) != want:
                    problems.append(f"{rel} has mode {p.stat().st_mode & 0o777:o}, not {want:o} (umask)")
        elif check == "quiet-stdout" and re.search(r"\beta \d+:\d\d|\d+%\||\d it/s", out):
            problems.append("progress bar on stdout")
        elif check.startswith("notice:") and not re.search(check.split(":", 1)[1], err):
            problems.append(f"no notice matching {check.split(':', 1)[1]!r} on stderr")
        elif check == "stale-reported":
            if not record.get("stale_before_rerun"):
                problems.append("the kill left no temporary directory to clean (signal too late?)")
            elif not re.search(r"(?i)stale|left over|leftover|tmp-|temporary", err):
                problems.append("stale temporary directory removed silently")
    return problems


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(ANSI.sub("", text).splitlines()) if ln.strip()), "")


def verify_outputs(results: list[dict], sandbox: Path, env: dict) -> dict:
    """Load every output of a successful run in one child process (one transformers import for all)."""
    todo = []
    for r in results:
        case = CASES[r["index"]]
        if r.get("skipped") or r.get("hang") or r.get("exit") != 0 or case.expect == "refuse":
            continue
        for rel, kind in case.outputs:
            if kind in ("model", "stats", "plan", "json", "dir"):
                p = Path(r["dir"]) / case.cwd / rel
                todo.append([f"{r['index']}:{rel}", str(p), kind])
    if not todo:
        return {}
    spec = sandbox / "verify.json"
    spec.write_text(json.dumps(todo))
    p = subprocess.run(
        [sys.executable, "-c", VERIFY_CODE, str(spec)], env=env, capture_output=True, text=True, timeout=900
    )
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {key: f"verifier failed: {p.stderr.strip().splitlines()[-1:]}" for key, _, _ in todo}


# ---- report -----------------------------------------------------------------------------------------------


def write_report(results: list[dict], out_dir: Path, suffix: str, commit: str, wall: float,
                 title: str) -> str:
    tried = [r for r in results if not r.get("skipped")]
    counts = {c: sum(r["class"] == c for r in tried) for c in CLASSES}
    summary = [
        "| | cases |",
        "|---|---:|",
        f"| cases tried | {len(tried)} |",
        *[f"| {c} | {counts[c]} |" for c in CLASSES],
        f"| skipped (not counted) | {len(results) - len(tried)} |",
    ]
    md = [
        "# Hostile-input benchmark" + (f" ({title})" if title else ""),
        "",
        f"`python benchmarks/hostile.py` on commit `{commit}`, {len(results)} cases "
        f"({len(tried)} run), wall time {wall:.0f} s. Classes and rules: benchmarks/hostile.py's docstring.",
        "",
        *summary,
        "",
        "| # | case | item | expect | exit | class | message |",
        "|---:|---|---:|---|---:|---|---|",
    ]
    for r in results:
        cls = r.get("class", "skipped")
        msg = (r.get("reason") or r.get("skipped") or "").replace("|", "\\|")[:140]
        exit_ = "" if r.get("skipped") else ("—" if r.get("hang") else r["exit"])
        md.append(
            f"| {r['index']} | {r['name'].replace('|', '/')} | {r['item']} | {r['expect']} | {exit_} | "
            f"{cls} | {msg} |"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"hostile{suffix}.md").write_text("\n".join(md) + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("before", "after", "dir")} for r in results]
    for r in slim:
        for k in ("stdout", "stderr"):
            if k in r:
                r[k] = r[k][-800:]
    report = {"commit": commit, "title": title, "wall_seconds": round(wall, 1),
              "python": sys.version.split()[0], "cases": len(results), "tried": len(tried), "counts": counts,
              "results": slim}
    (out_dir / f"hostile{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(counts, len(tried), out_dir / f"hostile{suffix}.png",
          f"{len(tried)} hostile inputs and faults against the moeprune CLI{', ' + title if title else ''}\n"
          f"(benchmarks/hostile.py on commit {commit})")
    return "\n".join(summary)


def _plot(counts: dict, tried: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["cases tried", "refused cleanly", "ok", "messy refusal", "wrongly refused", "traceback",
              "false success", "data lost", "hang"]
    values = [tried, *(counts[c] for c in labels[1:])]
    colours = ["#555555", "#2a9d3f", "#2a9d3f", "#e0a030", "#e0a030", "#d04040", "#d04040", "#8b0000",
               "#d04040"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = ax.barh(labels[::-1], values[::-1], color=colours[::-1])
    for bar, v in zip(bars, values[::-1]):
        ax.text(bar.get_width() + max(values) * 0.01, bar.get_y() + bar.get_height() / 2, str(v), va="center")
    ax.set_xlim(0, max(values) * 1.1 + 1)
    ax.set_xlabel("cases")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def commit_under_test(env: dict) -> str:
    """The commit of the moeprune that `python -m moeprune` imports here (found without importing it),
    marked when its package directory has uncommitted changes."""
    find = "import importlib.util; print(importlib.util.find_spec('moeprune').origin)"
    found = subprocess.run([sys.executable, "-c", find], env=env, capture_output=True, text=True)
    origin = found.stdout.strip()
    where = Path(origin).parent if origin else ROOT

    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + (" + uncommitted changes" if dirty else "")


def remove_sandbox(sandbox: Path) -> None:
    """Also after an interrupted run, whose cases never undid their mounts and immutable directories."""
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if f" {sandbox}/" in ln]
    for m in mounts:
        subprocess.run(["umount", "-l", m], capture_output=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(sandbox)], capture_output=True)
    shutil.rmtree(sandbox, ignore_errors=True)


# ---- main -------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", action="append", help="fnmatch pattern on case names, repeatable (e.g. 'SIG*')")
    ap.add_argument("--suffix", default="", help="appended to the result names, e.g. -before")
    ap.add_argument("--title", default="", help="what state of the code this is, e.g. 'before the fixes'")
    ap.add_argument("--keep", action="store_true", help="keep the sandbox and print its path")
    args = ap.parse_args()

    started = time.monotonic()
    umask = os.umask(0)
    os.umask(umask)
    # no case may reach the network (a missing tokenizer dir must not become a Hub lookup that hangs), and two
    # jobs on two cores should not each start a thread per core
    env = {**os.environ}
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                 ("OMP_NUM_THREADS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(k, v)
    commit = commit_under_test(env)
    patterns = args.only or ["*"]
    selected = [i for i, c in enumerate(CASES) if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    sandbox = Path(tempfile.mkdtemp(prefix="moeprune-hostile-"))
    try:
        print(f"sandbox {sandbox}; building fixtures", file=sys.stderr, flush=True)
        build_fixtures(sandbox / "fixtures", env)
        ready = time.monotonic() - started
        print(f"fixtures ready in {ready:.0f} s; {len(selected)} cases, {args.jobs} jobs", file=sys.stderr,
              flush=True)
        results = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_case, i, CASES[i], sandbox, env): i for i in selected}
            for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                r = fut.result()
                r["index"] = futures[fut]
                results.append(r)
                tag = r.get("skipped") and "skipped" or f"exit {r.get('exit')} in {r.get('seconds')} s"
                print(f"[{n}/{len(selected)}] {r['name']}: {tag}", file=sys.stderr, flush=True)
        results.sort(key=lambda r: r["index"])
        verified = verify_outputs(results, sandbox, env)
        for r in results:
            if not r.get("skipped"):
                r["class"], r["reason"] = classify(r, CASES[r["index"]], verified, umask)
        wall = time.monotonic() - started
        summary = write_report(results, Path(args.out), args.suffix, commit, wall, args.title)
        print(summary)
        print(f"\nwall time {wall:.0f} s; results in {args.out}/hostile{args.suffix}.md", file=sys.stderr)
    finally:
        if args.keep:
            print(f"sandbox kept: {sandbox}", file=sys.stderr)
        else:
            remove_sandbox(sandbox)
    return 0


if __name__ == "__main__":
    sys.exit(main())
