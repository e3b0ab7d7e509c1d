"""Perplexity, a bigram baseline on exactly the same predictions, and expert-usage entropy.

All perplexities here use one windowing rule so they can be compared: the token stream is cut
into fixed, non-overlapping windows of `seq_len` (the last one may be shorter), and within each
window every token but the first is predicted from the ones before it. The bigram baseline scores
the same (previous token, token) pairs, so "the model beats the bigram" compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def window_bounds(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """[start, end) of each non-overlapping window; a last window shorter than 2 tokens is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    return [(s, min(s + seq_len, n_tokens)) for s in range(0, n_tokens, seq_len) if n_tokens - s >= 2]


@dataclass
class EvalResult:
    nll_sum: float = 0.0  # natural-log loss summed over predicted tokens
    n_predicted: int = 0
    # Per MoE layer, how often each expert was in a token's top-k: one [E] int64 tensor per layer.
    expert_counts: list[torch.Tensor] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(1, self.n_predicted))


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    count_experts: bool = False,
    max_tokens: int | None = None,
) -> EvalResult:
    """Score a 1-D token stream `ids` window by window; optionally count top-k expert selections.

    Counting reads the router logits the model returns with `output_router_logits=True` (one
    `[B*T, E]` tensor per MoE layer) and takes their top-k, which is the routing the model used.
    """
    ids = ids[:max_tokens] if max_tokens else ids
    was_training = model.training
    model.eval()
    top_k = getattr(model.config, "num_experts_per_tok", None)
    res = EvalResult()
    bounds = window_bounds(len(ids), seq_len)
    # Full windows go in batches; a short last window runs alone so nothing needs padding.
    groups: list[list[tuple[int, int]]] = []
    full = [b for b in bounds if b[1] - b[0] == seq_len]
    groups += [full[i: i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[b] for b in bounds if b[1] - b[0] != seq_len]
    try:
        for group in groups:
            x = torch.stack([ids[s:e] for s, e in group])  # [B, T]
            out = model(input_ids=x, use_cache=False, output_router_logits=count_experts)
            logits = out.logits[:, :-1].float()  # [B, T-1, V]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            res.nll_sum += float(nll)
            res.n_predicted += x[:, 1:].numel()
            if count_experts:
                layers = out.router_logits or ()
                if not res.expert_counts:
                    res.expert_counts = [torch.zeros(r.shape[-1], dtype=torch.int64) for r in layers]
                for counts, r in zip(res.expert_counts, layers, strict=True):
                    sel = r.topk(top_k, dim=-1).indices  # [B*T, K]
                    counts += torch.bincount(sel.reshape(-1), minlength=r.shape[-1])
    finally:
        model.train(was_training)
    return res


def perplexity(
    model: torch.nn.Module, tokenizer, text: str, seq_len: int = 256, batch_size: int = 8,
    max_tokens: int | None = None,
) -> float:
    """Perplexity of `model` on `text` in fixed non-overlapping windows of `seq_len` tokens.

    The text is tokenized as one stream with no special tokens added, exactly as a calibration
    or evaluation text file is.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return evaluate_tokens(model, ids, seq_len, batch_size, max_tokens=max_tokens).perplexity


class BigramModel:
    """Add-one (Laplace) smoothed bigram: P(b | a) = (c(a, b) + 1) / (c(a) + V).

    c(a) counts the training pairs whose first token is a, so each row sums to one over the V
    tokens. Counts are kept sparse (sorted pair keys), since most of the V*V pairs never occur.
    """

    def __init__(
        self, train_ids: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor], vocab_size: int
    ):
        """Count pairs in `train_ids`: one 1-D stream, or several whose ends are not joined."""
        if isinstance(train_ids, (np.ndarray, torch.Tensor)) and train_ids.ndim == 1:
            train_ids = [train_ids]
        streams = [np.asarray(s, dtype=np.int64) for s in train_ids]
        self.vocab_size = V = vocab_size
        prev = np.concatenate([s[:-1] for s in streams])
        nxt = np.concatenate([s[1:] for s in streams])
        self._keys, self._pair_counts = np.unique(prev * V + nxt, return_counts=True)
        self._prev_counts = np.bincount(prev, minlength=V)

    def log_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Natural log P(nxt | prev), elementwise."""
        V = self.vocab_size
        keys = np.asarray(prev, dtype=np.int64) * V + np.asarray(nxt, dtype=np.int64)
        pos = np.searchsorted(self._keys, keys).clip(max=len(self._keys) - 1)
        pair = np.where(self._keys[pos] == keys, self._pair_counts[pos], 0)
        return np.log(pair + 1.0) - np.log(self._prev_counts[prev] + float(V))

    def perplexity(self, ids: np.ndarray | torch.Tensor, seq_len: int | None = None) -> float:
        """Perplexity on `ids`, predicting the same tokens as `evaluate_tokens` with this `seq_len`.

        With `seq_len=None` every token after the first is predicted.
        """
        ids = np.asarray(ids, dtype=np.int64)
        bounds = window_bounds(len(ids), seq_len) if seq_len else [(0, len(ids))]
        prev = np.concatenate([ids[s: e - 1] for s, e in bounds])
        nxt = np.concatenate([ids[s + 1: e] for s, e in bounds])
        return float(np.exp(-self.log_prob(prev, nxt).mean()))


def usage_entropy(counts: torch.Tensor | np.ndarray) -> float:
    """Entropy of expert-usage counts `[E]`, divided by log E: 1 is perfectly even, 0 one expert only."""
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(c))) if len(c) > 1 else 1.0
