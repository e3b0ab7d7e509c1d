"""Zero-shot tasks built from a plain text file, written as local lm-eval tasks.

Two tasks per domain (a domain is a name plus the `.txt` file of its held-out text, e.g. the
testbed's `prose.test.txt`); nothing here knows where the text came from. Both work on whole
lines, so the same rules serve verse and source code, and both are tokenizer-independent, so the
items are the same for every checkpoint.

**`moeprune_<domain>_mc`: which continuation is real (4-way multiple choice).**
An *anchor* is a line i such that lines i..j (1 to `max_continuation_lines` lines, none blank)
hold at least `continuation_chars` non-blank characters, and at least `context_chars` characters
of text come before line i. The context is the fewest whole lines before i that reach
`context_chars` characters (leading blank lines removed); the gold choice is lines i..j. The three
distractors are continuations of other anchors of the same text: not overlapping the item's own
context or the `EXCLUSION_LINES` lines after its continuation, textually distinct from the gold and
from each other, with the same indentation as the gold where possible (so code cannot be solved
by indentation alone), drawn at random from the `NEAREST` such candidates closest in length to the
gold. The gold's position among the four is random. lm-eval scores "context" + "\\n" + choice:
`acc` compares summed log-likelihoods, `acc_norm` the same divided by the choice's length in bytes.

**`moeprune_<domain>_cloze`: last word of a line (like LAMBADA).**
An anchor is a line whose last word (letters, digits, `_`, inner `'`; at least `min_word_chars`
long; only punctuation after it) is preceded by another word on the same line, with at least
`context_chars` characters of text before the line. The context is the fewest whole lines before
it reaching `context_chars`, plus the line up to the word; the target is the word with the
whitespace before it (" France", or "_value" after "self."), trailing punctuation excluded.
lm-eval `output_type: loglikelihood`; `acc` is 1 when the target is the model's greedy
continuation, token by token.

Anchors are sampled without replacement by `random.Random(f"{seed}:{domain}:{kind}")` and kept in
text order, so the items depend only on the text, the seed and the options. Documents joined into
one file are not told apart, so a context can occasionally span a document boundary.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from moeprune.errors import MoepruneError

FORMAT = 1  # bump when the way items are built changes, so results say which rule made them
TAG = "moeprune_testbed"  # every built task carries this tag: `--tasks moeprune_testbed` runs them all
NEAREST = 12  # distractors are drawn from this many length-nearest candidates
EXCLUSION_LINES = 20  # distractors never come from this close after the gold continuation
MIN_ITEMS = 8  # fewer valid items than this means the text is too short to make a task

# The last word of a line: an identifier or an English word with inner apostrophes, then only
# punctuation or spaces up to the end of the line.
_LAST_WORD = re.compile(r"([A-Za-z_](?:[A-Za-z0-9_']*[A-Za-z0-9_])?)[^A-Za-z0-9_]*$")
_WORD = re.compile(r"[A-Za-z0-9_]")
_DOMAIN = re.compile(r"^[a-z][a-z0-9_]*$")


def task_name(domain: str, kind: str) -> str:
    """`moeprune_<domain>_<kind>`, kind "mc" or "cloze"."""
    return f"moeprune_{domain}_{kind}"


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def _context_start(lines: list[str], i: int, context_chars: int) -> int | None:
    """The first line of the fewest whole lines before line i holding `context_chars` characters."""
    total = 0
    for j in range(i - 1, -1, -1):
        total += len(lines[j]) + 1
        if total >= context_chars:
            return j
    return None


def _context(lines: list[str], start: int, end: int) -> str:
    return "\n".join(lines[start:end]).lstrip("\n")


def _normal(text: str) -> str:
    return " ".join(text.split())


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _sample(rng: random.Random, anchors: list, n: int) -> list:
    chosen = rng.sample(range(len(anchors)), min(n, len(anchors)))
    return [anchors[k] for k in sorted(chosen)]


def mc_items(
    text: str, *, n: int = 300, seed: int = 0, domain: str = "text", context_chars: int = 300,
    continuation_chars: int = 40, max_continuation_lines: int = 4,
) -> list[dict]:
    """Up to `n` "which continuation is real" items: {id, line, context, choices[4], gold}."""
    lines = _lines(text)
    # every anchor: (first line, last line + 1, continuation text)
    anchors: list[tuple[int, int, str]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        chars, j = 0, i
        while j < len(lines) and j - i < max_continuation_lines and lines[j].strip():
            chars += len(lines[j].strip())
            j += 1
            if chars >= continuation_chars:
                break
        if chars >= continuation_chars:
            anchors.append((i, j, "\n".join(lines[i:j])))

    # candidate distractors by indentation, each bucket sorted by length
    buckets: dict[str, list[tuple[int, int, int, str]]] = {}
    for i, j, cont in anchors:
        buckets.setdefault(_indent(cont), []).append((len(cont), i, j, cont))
    everything = sorted(x for b in buckets.values() for x in b)
    for b in buckets.values():
        b.sort()

    def nearest(pool, length: int, ok) -> list[str]:
        """Up to NEAREST distinct acceptable continuations closest in length, from a sorted pool."""
        out: list[str] = []
        seen: set[str] = set()
        hi = bisect.bisect_left(pool, (length,))
        lo = hi - 1
        while len(out) < NEAREST and (lo >= 0 or hi < len(pool)):
            take_hi = lo < 0 or (hi < len(pool) and pool[hi][0] - length <= length - pool[lo][0])
            cand = pool[hi] if take_hi else pool[lo]
            hi, lo = (hi + 1, lo) if take_hi else (hi, lo - 1)
            key = _normal(cand[3])
            if key not in seen and ok(cand):
                seen.add(key)
                out.append(cand[3])
        return out

    usable = [
        (i, j, c, s) for i, j, c in anchors if (s := _context_start(lines, i, context_chars)) is not None
    ]
    rng = random.Random(f"{seed}:{domain}:mc")
    items = []
    for i, j, gold_text, start in _sample(rng, usable, n):
        gold_key = _normal(gold_text)

        def ok(cand, start=start, j=j, gold_key=gold_key):
            _, ci, cj, ctext = cand
            overlaps = ci < j + EXCLUSION_LINES and cj > start
            return not overlaps and _normal(ctext) != gold_key

        pool = nearest(buckets[_indent(gold_text)], len(gold_text), ok)
        if len(pool) < 3:
            pool = nearest(everything, len(gold_text), ok)
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3)
        gold = rng.randrange(4)
        choices.insert(gold, gold_text)
        items.append({"id": len(items), "line": i + 1, "context": _context(lines, start, i),
                      "choices": choices, "gold": gold})
    return items


def cloze_items(
    text: str, *, n: int = 300, seed: int = 0, domain: str = "text", context_chars: int = 300,
    min_word_chars: int = 3,
) -> list[dict]:
    """Up to `n` last-word items: {id, line, context, target}; context + target is the real text."""
    lines = _lines(text)
    anchors = []
    for i, line in enumerate(lines):
        m = _LAST_WORD.search(line)
        if m is None or len(m.group(1)) < min_word_chars:
            continue
        head = line[: m.start(1)]
        prefix = head.rstrip(" \t")
        if not _WORD.search(prefix):  # the word must not be the line's first: something to go on
            continue
        start = _context_start(lines, i, context_chars)
        if start is not None:
            anchors.append((i, start, prefix, head[len(prefix):] + m.group(1)))
    rng = random.Random(f"{seed}:{domain}:cloze")
    return [{"id": k, "line": i + 1, "context": _context(lines, start, i) + "\n" + prefix, "target": target}
            for k, (i, start, prefix, target) in enumerate(_sample(rng, anchors, n))]


class _Dumper(yaml.SafeDumper):
    """Writes strings holding newlines double-quoted ("\\n"), which reads better than YAML folding."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def _task_yaml(name: str, data: Path, cache: Path, kind: str, domain: str) -> dict:
    common = {
        "task": name,
        "tag": [TAG, f"moeprune_{domain}"],
        "dataset_path": "json",
        # a cache inside the task directory: nothing is left in ~/.cache when a temporary one goes
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
        "doc_to_text": "context",
    }
    if kind == "mc":
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": "\n",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": FORMAT},
        }
    # no `perplexity` metric: lm-eval bootstraps its stderr in a process pool, which costs more
    # than the whole task on a small CPU model
    return {**common, "output_type": "loglikelihood", "doc_to_target": "target", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": FORMAT}}


def _check_task_dir(out: Path, names: list[str]) -> None:
    """Refuse to overwrite files in `out` that an earlier `write_tasks` did not write (its manifest says
    which)."""
    if out.exists() and not out.is_dir():
        raise MoepruneError(f"--task-dir {out} is a file; give a directory for the built tasks")
    manifest = out / "manifest.json"
    ours: set[str] = set()
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            if isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("tasks"), dict):
                ours = {"manifest.json"} | {f"{n}.{ext}" for n in m["tasks"] for ext in ("jsonl", "yaml")}
        except ValueError:
            pass
    for name in ["manifest.json"] + [f"{n}.{ext}" for n in names for ext in ("jsonl", "yaml")]:
        if (out / name).exists() and name not in ours:
            raise MoepruneError(
                f"--task-dir {out} already holds {name}, which moeprune did not build; choose an "
                "empty or new --task-dir"
            )


def write_tasks(
    texts: Mapping[str, str | Path], out_dir: str | Path, *, n_items: int = 300, seed: int = 0,
    context_chars: int = 300,
) -> list[str]:
    """Build the two tasks of each `domain -> .txt path` into `out_dir`; return the task names.

    `out_dir` gets `<task>.jsonl` and `<task>.yaml` per task and a `manifest.json` with the
    sources' sha256, the options and the item counts. Pass it to lm-eval as an include path.
    """
    sources = {}
    for domain, path in texts.items():
        if not _DOMAIN.match(domain):
            raise MoepruneError(f"bad task domain name {domain!r}: use lower-case letters, digits and _")
        p = Path(path)
        if not p.is_file():
            raise MoepruneError(f"task text {p} for domain {domain!r} does not exist")
        sources[domain] = p.resolve()
    if n_items < 1:
        raise MoepruneError(f"the number of task items must be at least 1 (got {n_items})")

    out = Path(out_dir).resolve()
    _check_task_dir(out, [task_name(d, k) for d in sources for k in ("mc", "cloze")])
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".datasets_cache"
    manifest = {
        "format": FORMAT, "seed": seed, "n_items": n_items, "context_chars": context_chars, "tasks": {},
    }
    names = []
    for domain, path in sources.items():
        text = path.read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha256(text.encode()).hexdigest()
        built = {
            "mc": mc_items(text, n=n_items, seed=seed, domain=domain, context_chars=context_chars),
            "cloze": cloze_items(text, n=n_items, seed=seed, domain=domain, context_chars=context_chars),
        }
        for kind, items in built.items():
            name = task_name(domain, kind)
            if len(items) < min(MIN_ITEMS, n_items):
                raise MoepruneError(f"{path} gives only {len(items)} {kind} items for {name}; "
                                    f"it needs at least {MIN_ITEMS}: give a longer text")
            data = out / f"{name}.jsonl"
            data.write_text(
                "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8"
            )
            (out / f"{name}.yaml").write_text(
                yaml.dump(
                    _task_yaml(name, data, cache, kind, domain), Dumper=_Dumper, sort_keys=False,
                    allow_unicode=True,
                )
            )
            manifest["tasks"][name] = {"domain": domain, "kind": kind, "source": str(path), "sha256": digest,
                                       "items": len(items)}
            names.append(name)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return names


def parse_task_texts(specs: list[str] | None) -> dict[str, Path]:
    """`domain=path.txt` strings (the CLI's --task-text) -> {domain: path}."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        domain, sep, path = spec.partition("=")
        if not sep or not domain or not path:
            raise MoepruneError(f"bad --task-text {spec!r}: use DOMAIN=PATH.txt, e.g. prose=prose.test.txt")
        if domain in out:
            raise MoepruneError(f"--task-text domain {domain!r} given twice")
        out[domain] = Path(path)
    return out
