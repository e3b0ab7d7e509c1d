"""Perplexity of a causal LM on a text, over fixed non-overlapping windows.

The rule, chosen so that numbers are comparable between checkpoints and cheap to reproduce:

1. The documents of the source (one for a `.txt` file; one per file of a directory or per line of
   a `.jsonl`, as in `moeprune.data.load_texts`) are tokenised without special tokens and each is
   followed by the tokenizer's EOS token, exactly as calibration text is packed.
2. `max_tokens`, when given, keeps the first `max_tokens` tokens of that stream.
3. The stream is cut into consecutive windows of `seq_len` tokens: window w is tokens
   `[w*seq_len, (w+1)*seq_len)`. Windows never overlap, and the ragged tail (fewer than `seq_len`
   tokens) is **dropped**, so every window has the same length and the same context profile.
4. Within a window every token after the first is scored from the tokens before it in the same
   window. No BOS is inserted. Tokens scored = windows * (seq_len - 1).

ppl = exp(mean NLL), with the NLL summed in float64. The result depends only on the model, the
tokenizer, the text and the settings (no sampling), so it is deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from moeprune.arch.base import text_generator
from moeprune.errors import MoepruneError


def _documents(text_or_path: str | Path | Sequence[str]) -> tuple[list[str], str]:
    """The documents to score and a short name for where they came from.

    A `Path`, or a one-line string naming an existing file or directory, is read from disk; a
    sequence of strings is a list of documents; any other string is the text itself. A one-line
    string ending in a text-file suffix that does not exist is treated as a mistyped path, not as
    text, so a typo fails loudly instead of scoring the file name.
    """
    from moeprune.data import load_texts

    if isinstance(text_or_path, Path):
        if not text_or_path.exists():
            raise MoepruneError(f"text file {text_or_path} does not exist")
        return load_texts(str(text_or_path)), str(text_or_path)
    if isinstance(text_or_path, str):
        one_line = "\n" not in text_or_path and len(text_or_path) < 4096
        if one_line and Path(text_or_path).exists():
            return load_texts(text_or_path), text_or_path
        if one_line and Path(text_or_path).suffix in (".txt", ".jsonl", ".md", ".py", ".text"):
            raise MoepruneError(f"text file {text_or_path} does not exist")
        return [text_or_path], "<text>"
    docs = [str(t) for t in text_or_path]
    return docs, f"<{len(docs)} documents>"


def token_stream(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """[N] token ids of the documents, each followed by EOS (the calibration packing)."""
    from moeprune.data import pack_tokens

    return pack_tokens(tokenizer, list(documents))


def windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[W, seq_len] consecutive non-overlapping windows of the first `max_tokens` tokens; tail dropped."""
    if seq_len < 2:
        raise MoepruneError(f"--seq-len must be at least 2 (got {seq_len})")
    if max_tokens is not None and max_tokens < seq_len:
        raise MoepruneError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}")
    used = tokens[:max_tokens] if max_tokens is not None else tokens
    W = used.numel() // seq_len
    if W == 0:
        raise MoepruneError(
            f"the text has {used.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text or lower --seq-len"
        )
    return used[: W * seq_len].view(W, seq_len)


def _check_model_fits(model, tokens: torch.Tensor, seq_len: int) -> None:
    """Fail with the numbers before running if the ids or the window do not fit the model."""
    model = text_generator(model)  # a wrapper with no forward of its own (Qwen3-Omni) has no embeddings
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and tokens.numel() and int(tokens.max()) >= vocab:
        raise MoepruneError(f"the tokenizer produced id {int(tokens.max())} but the model has only {vocab} "
                            "embeddings; the tokenizer does not belong to this model")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise MoepruneError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}; "
                            f"use --seq-len {max_pos} or less")


@torch.no_grad()
def window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """[B] summed NLL (float64) of tokens 1..L-1 of each window in `batch` [B, L]."""
    logits = text_generator(model)(input_ids=batch, use_cache=False).logits  # [B, L, V]
    return logits_nll(logits, batch)


def text_windows(tokenizer, text_or_path: str | Path | Sequence[str], seq_len: int,
                 max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """[W, seq_len] windows to score (see the module doc) and the facts about the text a result reports."""
    docs, source = _documents(text_or_path)
    tokens = token_stream(tokenizer, docs)
    blocks = windows(tokens, seq_len, max_tokens)  # [W, L]
    digest = hashlib.sha256("\x1e".join(docs).encode("utf-8", errors="replace")).hexdigest()
    return blocks, {
        "text_tokens": int(tokens.numel()), "max_tokens": max_tokens, "source": source, "sha256": digest,
    }


def perplexity_result(total_nll: float, blocks: torch.Tensor, facts: dict) -> dict:
    """The result dict of a perplexity run from the summed NLL over `blocks` [W, L]."""
    W, L = blocks.shape
    scored = W * (L - 1)
    nll = float(total_nll) / scored
    return {"ppl": math.exp(nll), "nll": nll, "tokens": scored, "windows": W, "seq_len": L, **facts}


def logits_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """[B] summed NLL (float64) of tokens 1..L-1 of each window, from logits [B, L, V] of `batch` [B, L]."""
    # float32 log-softmax per window keeps the [B, L, V] upcast of half-precision models small
    nll = [F.cross_entropy(lg[:-1].float(), ids[1:], reduction="sum") for lg, ids in zip(logits, batch)]
    return torch.stack(nll).double()


def perplexity(
    model, tokenizer, text_or_path: str | Path | Sequence[str], *, seq_len: int = 512,
    max_tokens: int | None = None, batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Perplexity of `model` on a text over non-overlapping windows of `seq_len` (see the module doc).

    `text_or_path` is a path (`.txt`, `.jsonl`, directory), the text itself, or a list of documents.
    `max_tokens` keeps only the first `max_tokens` tokens of the packed stream, to cap the cost.
    `progress`, if given, is called with (windows done, windows in all) after each batch.

    Returns `ppl`, `nll` (mean NLL in nats per scored token), `tokens` (scored), `windows`,
    `seq_len`, `text_tokens` (tokens in the whole packed text), `source` and `sha256` of the text.
    """
    if batch_size < 1:
        raise MoepruneError(f"--batch-size must be at least 1 (got {batch_size})")
    blocks, facts = text_windows(tokenizer, text_or_path, seq_len, max_tokens)
    _check_model_fits(model, blocks, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, blocks.shape[0], batch_size):
            total += window_nll(model, blocks[start: start + batch_size].to(device)).sum().cpu()
            if progress is not None:
                progress(min(start + batch_size, blocks.shape[0]), blocks.shape[0])
    finally:
        model.train(was_training)
    return perplexity_result(float(total), blocks, facts)
