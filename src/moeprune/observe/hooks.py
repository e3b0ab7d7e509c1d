"""Reading routing and raw expert outputs where the experts receive them, for every family.

`install_observer(adapter, block, record)` routes each call of a block's experts through `record`
and returns the undo function. Three paths, chosen from the adapter's facts and the experts module:

* grouped: the experts run transformers' built-in grouped_mm forward; it is followed step for step,
  keeping the raw outputs it computes (sorted by expert), so the experts run once and the model's
  output is the same bit for bit;
* dense (Llama 4, `adapter.dense_experts`): the experts run every (expert, token) row on
  score-scaled inputs; the model's own forward runs and the routed rows are picked from its output;
* generic (anything else: eager experts, a forward someone else installed): the family's experts
  kernel runs with top-1 routing and unit weights on each routed pair (`adapter.expert_outputs`).

Mechanism: the observer is an instance attribute `forward` on the experts module, removed by the
undo (the Observer context manager always calls it, on errors too). Registering it as an experts
implementation in transformers' `ALL_EXPERTS_FUNCTIONS` instead was considered and not done: the
dispatch reads `config._experts_implementation`, and one config object is shared by every experts
module of the model, so observing one layer (the layer-by-layer loop does) would reroute all of
them and mutate a config the caller owns, plus a process-wide registry entry; it would also not
cover Llama 4 (not dispatched) nor experts whose forward was already wrapped (accelerate), which
need the instance path anyway. The statistics and overhead of both are the same calls.

Shape letters: E experts, K top-k, H hidden, I expert width, T tokens, S routed (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moeprune import compat
from moeprune.arch import Adapter


def grouped_mm_steps(ex: nn.Module) -> GroupedMMSteps | None:
    """The steps of the grouped_mm experts forward when `ex` runs exactly that forward, else None."""
    return GroupedMMSteps() if compat.runs_builtin_grouped_mm(ex) else None


class GroupedMMSteps:
    """The expert part of transformers' `grouped_mm_experts_forward` (pinned transformers 5.23).

    Given rows already sorted by expert it returns each row's raw expert output, computed by the
    same calls on the same tensors as the model's own forward, so the numbers are identical (the
    observer tests check the observed forward equals the plain one bit for bit).
    """

    def raw_outputs(self, ex: nn.Module, x_g: torch.Tensor, expert_ids_g: torch.Tensor) -> torch.Tensor:
        """x_g [S, H] and expert_ids_g [S] sorted by expert -> [S, H] raw outputs, before gating."""
        linear = compat.grouped_linear
        hist_in = expert_ids_g.float() if x_g.device.type in ("cpu", "mps") else expert_ids_g.int()
        tokens_per_expert = torch.histc(hist_in, bins=ex.num_experts, min=0, max=ex.num_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [E]
        if ex.has_gate:
            weights, bias = ex.gate_up_proj, ex.gate_up_proj_bias[expert_ids_g] if ex.has_bias else None
        else:
            weights, bias = ex.up_proj, ex.up_proj_bias[expert_ids_g] if ex.has_bias else None
        h = linear(x_g, weights, offsets, bias=bias, is_transposed=ex.is_transposed)  # [S, 2I] or [S, I]
        h = compat.apply_gate(ex, h) if ex.has_gate else ex.act_fn(h)  # [S, I]
        bias = ex.down_proj_bias[expert_ids_g] if ex.has_bias else None
        out = linear(h, ex.down_proj, offsets, bias=bias, is_transposed=ex.is_transposed)  # [S, H]
        return ex.post_expert_norm(out) if ex.has_post_expert_norm else out


def install_observer(adapter: Adapter, block: nn.Module, record) -> Callable[[], None]:
    """Route every call of the block's experts through `record` and return the undo function.

    `record(expert_ids, gates, raw [S,H], scratch)` sees the model's own routing, read where the
    experts receive it (never recomputed), and each routed pair's raw output: `expert_ids` and
    `gates` flatten to [S] in the order of raw's rows (token-major [T,K], or sorted by expert
    when the grouped_mm steps are followed); `scratch` is a spent [S,H] buffer (or None) it may
    overwrite. The wrapped forward then combines the raw outputs itself, so the experts run once.
    """
    if adapter.dense_experts:
        return _install_dense(adapter, block, record)
    ex = adapter.experts(block)
    previous = ex.__dict__.get("forward")  # an instance forward set by someone else (accelerate)
    steps = grouped_mm_steps(ex) if previous is None else None

    def grouped_forward(hidden, top_k_index, top_k_weights):
        # transformers' grouped_mm experts forward, step for step, keeping the raw outputs it
        # computes (sorted by expert) instead of running the experts again with top-1 routing
        T, K = top_k_index.shape
        sample_weights = top_k_weights.reshape(-1)  # [S]
        expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))  # the model's own (unstable) sort
        x_g = hidden[perm // K]  # [S, H]
        w_g = sample_weights[perm]  # [S]
        raw = steps.raw_outputs(ex, x_g, expert_ids_g)  # [S, H]
        weighted = raw * w_g.unsqueeze(-1)  # [S, H]
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
        out = weighted[inv_perm].view(T, K, -1).sum(dim=1).to(hidden.dtype)  # [T, H]
        if adapter.skip_class:  # pairs sent to the skip class (expert 0, gate 0) are no expert's
            routed = w_g != 0
            record(expert_ids_g[routed], w_g[routed], raw[routed], None)
        else:
            record(expert_ids_g, w_g, raw, weighted)  # `weighted` is spent: the statistics reuse it
        return out

    def observed_forward(hidden, top_k_index, top_k_weights):
        T, K = top_k_index.shape
        shape = hidden.shape  # [T, H], or [B, L, H] for experts that take the block's input as is (DBRX)
        hidden = hidden.reshape(T, -1)
        x = hidden.repeat_interleave(K, dim=0) if K > 1 else hidden  # [S, H], row s = token s // K
        raw = adapter.kernel_outputs(block, x, top_k_index.reshape(-1))  # [S, H]
        weighted = raw.view(T, K, -1) * top_k_weights.to(raw.dtype)[..., None]  # [T, K, H]
        out = weighted.sum(dim=1).to(hidden.dtype)  # [T, H]
        if adapter.skip_class:  # pairs sent to the skip class (expert 0, gate 0) are no expert's
            routed = top_k_weights.reshape(-1) != 0  # [S]
            record(top_k_index.reshape(-1)[routed], top_k_weights.reshape(-1)[routed], raw[routed], None)
        else:
            record(top_k_index, top_k_weights, raw, weighted)  # `weighted` is spent: the statistics reuse it
        return out.view(shape)

    ex.forward = observed_forward if steps is None else grouped_forward

    def undo():
        if previous is None:
            del ex.forward
        else:
            ex.forward = previous

    return undo


def _install_dense(adapter: Adapter, block: nn.Module, record) -> Callable[[], None]:
    """Llama 4: the experts run all E x T rows on score-scaled inputs; the routed rows are picked out.

    The recorded output of expert i on token x is its contribution E_i(g_i(x) x) and the gate is
    g_i(x) (see `Llama4Text`); the scores come from the router's output, caught by a forward hook.
    """
    ex, router = adapter.experts(block), adapter.router(block)
    previous = ex.__dict__.get("forward")
    scores_seen = []  # the current call's [T, E] scores, handed from the router to the experts

    def keep_scores(module, args, output):
        scores_seen[:] = [output[adapter.router_scores_index]]

    handle = router.register_forward_hook(keep_scores)

    def observed_forward(routed_in):
        out = type(ex).forward(ex, routed_in)  # [E*T, H]
        scores = scores_seen[0]  # [T, E]; exactly zero outside the top-k (sigmoid(-inf))
        T, E = scores.shape
        top_k_weights, top_k_index = scores.topk(adapter.top_k, dim=-1)  # [T, K]
        per_expert = out.view(E, T, -1)  # [E, T, H]
        tokens = torch.arange(T, device=out.device)[:, None].expand_as(top_k_index)  # [T, K]
        raw = per_expert[top_k_index.reshape(-1), tokens.reshape(-1)]  # [T*K, H]
        record(top_k_index, top_k_weights, raw, None)
        return out

    ex.forward = observed_forward

    def undo():
        if previous is None:
            del ex.forward
        else:
            ex.forward = previous
        handle.remove()

    return undo
