"""Calibration sources -> packed token blocks.

A source is a `.txt` file, a directory of text files, a `.jsonl` file (text in the `text` field by
default), or `hf:NAME[:CONFIG]:SPLIT` read through `datasets` when a hub is reachable. For `.jsonl`
and `hf:` rows, `field` names another text field, and `template` builds each document from several
fields with `str.format` ("Q: {question} A: {answer}"), which is how task-specific calibration
reads a task's own data (UNCURL). Documents are joined with the tokenizer's EOS token and cut
into non-overlapping blocks of `seq_len` tokens; `samples` blocks are drawn with a seeded generator.
Packing means there is no padding, so every observed token is a real token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.errors import MoepruneError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}
FILE_CAP = 256 * 1024**2  # bytes of one calibration file read at most (far beyond what any --samples needs)


@dataclass
class Calibration:
    input_ids: torch.Tensor  # [N, L] packed token blocks
    provenance: dict  # source, sha256 of the text, samples, seq_len, seed, available blocks


def _row_text(row: dict, field: str | None, template: str | None, where: str) -> str:
    """One document from a JSON row: `template` filled from its fields, else its `field` (default `text`)."""
    if not isinstance(row, dict):
        raise MoepruneError(f"{where} is not a JSON object; --calib .jsonl needs one object per line")
    if template is None:
        try:
            return str(row[field or "text"])
        except KeyError as e:
            raise MoepruneError(f"{where} has no field {e}; choose the text field with --calib-field "
                                f"(fields: {', '.join(map(str, row))})")
    try:
        return template.format(**row)
    except KeyError as e:
        raise MoepruneError(
            f"{where} has no field {e} used by --calib-template (fields: {', '.join(map(str, row))})"
        )
    except (IndexError, ValueError, TypeError, AttributeError) as e:
        raise MoepruneError(
            f"bad --calib-template {template!r} ({e}); name fields in braces, e.g. "
            "'Q: {question} A: {answer}'"
        )


def _jsonl_texts(path: Path, field: str | None, template: str | None, max_bytes: int) -> list[str]:
    texts = []
    for n, raw in enumerate(_read_capped(path, max_bytes).split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MoepruneError(
                f"{path}:{n} is not UTF-8 text (byte {e.start}); --calib .jsonl must be UTF-8: "
                "re-encode the file"
            )
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoepruneError(
                f"{path}:{n} is not valid JSON ({e.msg}); --calib .jsonl needs one object per line"
            )
        texts.append(_row_text(row, field, template, f"{path}:{n}"))
    return texts


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """At most `max_bytes` of a file (a device like /dev/zero, or a huge dump, would read until memory runs
    out)."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise MoepruneError(f"cannot read calibration file {path} ({e.strerror})")
    if len(data) > max_bytes:  # cut at the last line end, so no document is cut mid-line
        data = data[:max_bytes]
        data = data[: data.rfind(b"\n") + 1] or data
    return data


def _decode_text(path: Path, data: bytes, notify) -> str:
    """UTF-8 text of a calibration file; refuse binary data, and say so when some bytes had to be replaced."""
    if not data:
        return ""
    nul = data.count(b"\0")
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if nul > len(data) // 100 or replaced > len(text) // 10:
        raise MoepruneError(
            f"calibration file {path} is binary, not text ({nul} NUL bytes, {replaced} undecodable "
            "in the first part read); give UTF-8 text"
        )
    if replaced and notify is not None:
        notify(f"calibration file {path}: {replaced} invalid UTF-8 sequences were replaced by U+FFFD")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading gives


def _hf_texts(spec: str, field: str | None, template: str | None, max_chars: int) -> list[str]:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise MoepruneError(f"bad dataset spec {spec!r}: use hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise MoepruneError("hf: calibration sources need the datasets package: pip install 'moeprune[hf]'")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the hub may be unreachable; say so in one line
        raise MoepruneError(f"could not load dataset {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}")
    texts, total = [], 0
    for row in ds:
        text = _row_text(dict(row), field, template, f"a row of {spec}")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def load_texts(spec: str, field: str | None = None, template: str | None = None,
               max_chars: int = 50_000_000, notify=None) -> list[str]:
    """The documents of a calibration source, in a stable order.

    A hub dataset is read up to `max_chars`; files up to `max(max_chars, FILE_CAP)` bytes, so an
    endless device or a huge dump cannot exhaust memory while ordinary corpora are read whole.
    """
    if field and template:
        raise MoepruneError(
            "give --calib-field (one text field) or --calib-template (several fields), not both"
        )
    if spec.startswith("hf:"):
        return _hf_texts(spec, field, template, max_chars)
    path = Path(spec)
    if not spec.strip() or not path.exists():
        raise MoepruneError(
            f"calibration source {spec!r} does not exist (give a .txt, .jsonl, a directory, or hf:NAME:SPLIT)"
        )
    if (field or template) and path.suffix != ".jsonl":
        raise MoepruneError(
            f"--calib-field and --calib-template read the fields of .jsonl rows (or hf: datasets); "
            f"{spec} is plain text, so drop them or give a .jsonl file"
        )
    cap = max(max_chars, FILE_CAP)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        texts, budget = [], cap
        for f in files:
            if budget <= 0:
                break
            texts.append(_decode_text(f, _read_capped(f, budget), notify))
            budget -= len(texts[-1])
    elif path.suffix == ".jsonl":
        texts = _jsonl_texts(path, field, template, cap)
    else:
        texts = [_decode_text(path, _read_capped(path, cap), notify)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoepruneError(f"calibration source {spec} has no text")
    return texts


def pack_tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    """[total] token ids of all documents joined by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def calibration_blocks(
    tokenizer, spec: str, *, samples: int = 128, seq_len: int = 512, seed: int = 0,
    field: str | None = None, template: str | None = None, vocab_size: int | None = None, notify=None,
) -> Calibration:
    """Tokenise a calibration source and draw `samples` blocks of `seq_len` tokens.

    `vocab_size`, the model's, refuses a tokenizer whose ids the model's embeddings cannot look up.
    """
    from moeprune.settings import check_settings

    check_settings(samples=samples, seq_len=seq_len, seed=seed)
    # ~64 characters per wanted token: far more than the samples need, bounded whatever the source is
    texts = load_texts(spec, field, template, max_chars=max(64 * samples * seq_len, 1_000_000), notify=notify)
    tokens = pack_tokens(tokenizer, texts)
    if vocab_size is not None and tokens.numel() and int(tokens.max()) >= vocab_size:
        raise MoepruneError(
            f"the tokenizer gives token id {int(tokens.max())}, beyond the model's vocabulary of "
            f"{vocab_size}; --tokenizer must be the model's own tokenizer"
        )
    available = tokens.numel() // seq_len
    if available == 0:
        raise MoepruneError(
            f"calibration text {spec} has {tokens.numel()} tokens, fewer than one block of --seq-len "
            f"{seq_len}; give more text or lower --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=g)[: min(samples, available)].sort().values
    blocks = tokens[: available * seq_len].view(available, seq_len)[chosen]  # [N, L]
    digest = hashlib.sha256("\x1e".join(texts).encode("utf-8", errors="replace")).hexdigest()
    provenance = {
        "source": spec, "field": field, "template": template, "sha256": digest, "documents": len(texts),
        "samples_requested": samples, "samples": int(blocks.shape[0]), "blocks_available": int(available),
        "seq_len": seq_len, "seed": seed,
    }
    return Calibration(blocks, provenance)
