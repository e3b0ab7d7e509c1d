"""Gather one compressed layer's compensation fit on the calibration batches, then write it.

Called by the walk right after a layer plan is applied (`moeprune.methods.compensation` holds the
arithmetic and the readings). Each calibration batch runs through the decoder layer with the
compressed block; a hook on the block sees its input, runs the *original* block (a copy taken before
surgery) on the same input, and records, at the experts boundary of both, what the experts received,
the routing and the experts module's output. The fit target is the original experts output minus the
compressed one, so everything outside the experts (attention, shared experts, projections after the
experts) is the same on both sides and needs no family code.

Nothing is held per token beyond one batch, except the held-out share of the sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from moeprune import compat
from moeprune.arch import Adapter
from moeprune.arch.base import is_novice_experts
from moeprune.errors import MoepruneError
from moeprune.methods.compensation import CompensationConfig, LowRankDelta, RidgeFit, RoutedPairs
from moeprune.methods.router_refit import GATE_TOLERANCE
from moeprune.plan import LayerPlan

LINEARITY_TOLERANCE = 1e-3  # relative: the experts' raw output must be down_proj(hidden units) + bias


@contextlib.contextmanager
def experts_calls(adapter: Adapter, block: nn.Module) -> Iterator[list]:
    """Record every call of the block's experts: (inputs [T, D], top_k_index [T, K], weights [T, K],
    output [T, D]); the experts run as before."""
    ex = adapter.experts(block)
    previous = ex.__dict__.get("forward")
    calls: list = []

    def recorded(hidden, top_k_index, top_k_weights):
        out = previous(hidden, top_k_index, top_k_weights) if previous is not None else \
            type(ex).forward(ex, hidden, top_k_index, top_k_weights)
        T = top_k_index.shape[0]
        calls.append((hidden.reshape(T, -1), top_k_index, top_k_weights, out.reshape(T, -1)))
        return out

    ex.forward = recorded
    try:
        yield calls
    finally:
        if previous is None:
            del ex.forward
        else:
            ex.forward = previous


def both_calls(adapter: Adapter, original: nn.Module, block: nn.Module, x_block: torch.Tensor,
               mine: list | None) -> tuple[tuple, tuple]:
    """The experts call (`experts_calls`) of the original block and of the compressed one on x_block
    [B, L, H]. `mine` is what was recorded while the layer ran the compressed block on x_block; without it
    the compressed block runs here again."""
    with experts_calls(adapter, original) as ref:
        adapter.moe_forward(original, x_block)
    if mine is None:
        with experts_calls(adapter, block) as mine:
            adapter.moe_forward(block, x_block)
    if len(ref) != 1 or len(mine) != 1:
        raise MoepruneError(f"{adapter.family}: its MoE block called its experts {len(mine)} times on one "
                            "batch; compensation needs one call; use --compensate none")
    return ref[0], mine[0]


def expert_hidden(adapter: Adapter, block: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[S, I] hidden units a = act(gate x) * up x of expert ids[s] on x[s] [S, D], what its down
    projection reads (the experts' own gating function where transformers gives them one)."""
    ex = adapter.experts(block)
    out = None
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().squeeze(1)
        xe = x[rows]
        if adapter.gated and hasattr(ex, "_apply_gate") and isinstance(getattr(ex, "gate_up_proj", None),
                                                                       torch.Tensor):
            W = ex.gate_up_proj[e]  # [2I, H], or [H, 2I] when transposed
            h = xe @ (W if adapter.transposed else W.T)  # [S_e, 2I]
            bias = getattr(ex, "gate_up_proj_bias", None)
            if isinstance(bias, torch.Tensor):
                h = h + bias[e]
            a = compat.apply_gate(ex, h)
        else:
            w = adapter.expert_weights(block, e)
            up = xe @ w.up.T + (w.up_bias if w.up_bias is not None else 0)
            if w.gate is None:
                a = ex.act_fn(up)
            else:
                a = ex.act_fn(xe @ w.gate.T + (w.gate_bias if w.gate_bias is not None else 0)) * up
        if out is None:
            out = a.new_empty(x.shape[0], a.shape[1])
        out[rows] = a
    return out


def _down(adapter: Adapter, block: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = adapter.expert_weights(block, e)
    return w.down, w.down_bias  # [D, I], [D]


def check_linear_down(adapter: Adapter, block: nn.Module, x: torch.Tensor, ids: torch.Tensor,
                      router_ids: torch.Tensor) -> None:
    """Refuse, in one line, experts whose raw output is not down_proj(`expert_hidden`) + bias on these pairs
    (a norm after the experts, a projected space): refitting the down projection would not be exact.

    `ids` [S] are rows of the experts tensors, `router_ids` [S] what the router calls them (they differ
    in a layer with novices)."""
    a = expert_hidden(adapter, block, x, ids)  # [S, I]
    raw = adapter.expert_outputs(block, x, router_ids).float()  # [S, D]
    rows = []
    for s in range(ids.numel()):
        down, bias = _down(adapter, block, int(ids[s]))  # [D, I], [D]
        rows.append(a[s] @ down.T + (0 if bias is None else bias))
    mine = torch.stack(rows).float()  # [S, D]
    err = float((mine - raw).norm() / raw.norm().clamp(min=1e-12))
    if not err <= LINEARITY_TOLERANCE:
        raise MoepruneError(f"{adapter.family}: its experts' output is not a linear down projection of their "
                            f"hidden units (relative mismatch {err:.2g}), so compensation cannot refit it; "
                            "use --compensate none")


class LayerCompensation:
    """One layer's fit: the hook that gathers batches, then `finish()` solves and writes."""

    def __init__(self, cfg: CompensationConfig, adapter: Adapter, block: nn.Module, original: nn.Module,
                 lp: LayerPlan, held_out_sequences, combine=None):
        """`combine(tensor)` sums a tensor over the calibration processes (torchrun; `Ranks.sum_over_ranks`),
        so that every process fits on all the batches and writes the same tensors."""
        if adapter.dense_experts:
            raise MoepruneError(f"{adapter.family}: its experts run densely on gate-scaled inputs; "
                                "compensation supports experts that take (tokens, top-k ids, gates); "
                                "use --compensate none")
        self.cfg, self.adapter, self.block, self.original, self.lp = cfg, adapter, block, original, lp
        self.held_out_sequences = held_out_sequences  # callable: sequence ids [B] -> bool [B]
        ex = adapter.experts(block)
        self.novices = is_novice_experts(ex)
        self.R = lp.num_experts_out
        self.N = len(lp.novices)
        if not isinstance(getattr(ex, "down_proj", None), torch.Tensor):
            raise MoepruneError(f"{adapter.family}: its experts hold no down_proj tensor [E, D, I] to refit; "
                                "use --compensate none")
        width = ex.down_proj.shape[2] if not adapter.transposed else ex.down_proj.shape[1]
        self.fit = RidgeFit(cfg, self.R, width, self.N, adapter.expert_dim)
        if combine is not None:
            self.fit.combine = combine
        self.combine = combine or (lambda t: t)
        self.checked = False
        self.reference = 0.0  # Σ ||original experts output||² over the held-out tokens

    @torch.no_grad()
    def add_batch(self, x_block: torch.Tensor, sequences: torch.Tensor, mine: list | None = None) -> None:
        """Compare both blocks on one batch's block input x_block [B, L, H] (sequence ids [B]).

        `mine` is what `experts_calls` recorded while the layer ran the compressed block on x_block; without
        it the compressed block runs here again."""
        adapter = self.adapter
        (_, _, _, y_ref), (x, idx, w, y) = both_calls(adapter, self.original, self.block, x_block, mine)
        T, K = idx.shape
        device = x.device  # the experts' inputs stay there; what the fit accumulates moves to the CPU
        routed = idx.reshape(-1)  # [T*K] router ids of the compressed block
        # router ids -> rows of the experts tensors: < R the kept experts, then the novices
        slot = (self.adapter.experts(self.block).expert_map[routed] if self.novices else routed).cpu()
        gate = w.reshape(-1).float().cpu()
        token = torch.arange(T).repeat_interleave(K)
        kept = (slot < self.R) & (gate != 0)
        novice = (slot >= self.R) & (slot < self.R + self.N) if self.novices else torch.zeros_like(kept)
        dtype = next(self.block.parameters()).dtype
        if not self.checked and kept.any():
            sample = kept.nonzero().squeeze(1)[:64]
            check_linear_down(adapter, self.block, x[token[sample].to(device)].to(dtype),
                              slot[sample].to(device),
                              routed[sample.to(routed.device)])
            self.checked = True
        ids = slot[kept]
        a = expert_hidden(adapter, self.block, x[token[kept].to(device)].to(dtype), ids.to(device))
        a = a.float().cpu()  # [S, I]
        y_ref = y_ref.float().cpu()
        target = y_ref - y.float().cpu()  # [T, D]
        x_novice = x[token[novice].to(device)].float().cpu() if self.cfg.low_rank else None
        held = self.held_out_sequences(sequences).repeat_interleave(T // sequences.numel())  # [T]
        pairs = RoutedPairs(token[kept], ids, a * gate[kept][:, None], token[novice],
                            slot[novice] - self.R, gate[novice], target, x_novice)
        for part in (False, True):
            rows = held if part else ~held
            if rows.any():
                self.fit.add(_subset(pairs, rows), held_out=part)
                if part:
                    self.reference += float((y_ref[rows] ** 2).sum())

    @torch.no_grad()
    def finish(self) -> dict:
        """Solve, write what was accepted into the compressed block (surgery), and return the notes."""
        from moeprune.surgery.compensation import add_to_down, add_to_novices, make_low_rank_novices

        dW, dn, notes = self.fit.solve()
        self.reference = float(self.combine(torch.tensor(self.reference, dtype=torch.float64)))
        if self.reference > 0:
            notes["held_out_relative_before"] = notes["held_out_error_before"] / self.reference
            notes["held_out_relative_after"] = notes["held_out_error_after"] / self.reference
        if dW is not None:
            add_to_down(self.adapter, self.block, dW)
        if isinstance(dn, LowRankDelta):
            make_low_rank_novices(self.adapter, self.block, dn.bias, dn.up, dn.down)
        elif dn is not None:
            add_to_novices(self.adapter, self.block, dn)
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in notes.items()}


def _subset(p: RoutedPairs, rows: torch.Tensor) -> RoutedPairs:
    """The pairs of the tokens in `rows` [T] (bool), tokens renumbered."""
    new = torch.full((rows.numel(),), -1, dtype=torch.long)
    new[rows] = torch.arange(int(rows.sum()))
    k, n = rows[p.tokens], rows[p.novice_tokens]
    inputs = None if p.novice_inputs is None else p.novice_inputs[n]
    return RoutedPairs(new[p.tokens[k]], p.slots[k], p.hidden[k], new[p.novice_tokens[n]], p.novice_slots[n],
                       p.novice_gates[n], p.target[rows], inputs)


def held_out_rule(holdout: float):
    """Sequence ids [B] -> bool [B]: every round(1/holdout)-th calibration sequence is held out."""
    every = max(2, round(1 / holdout))
    return lambda seq: (seq % every) == every - 1



class LayerRouterRefit:
    """One layer's router refit (`moeprune.methods.router_refit`): the hook gathers batches, `finish()`
    scores each ridge strength by running the block with the new router on the held-out sequences, and
    writes the best (surgery) when it lowers the held-out error."""

    def __init__(self, cfg: CompensationConfig, adapter: Adapter, block: nn.Module, original: nn.Module,
                 lp: LayerPlan, held_out_sequences):
        from moeprune.methods.router_refit import RouterRidge, kept_directions

        if adapter.dense_experts or is_novice_experts(adapter.experts(block)):
            raise MoepruneError(f"{adapter.family}: --compensate {cfg.fit} refits the router of a stock "
                                "output (experts that take (tokens, top-k ids, gates), no novices); use "
                                "--compensate down")
        router = adapter.router(block)
        W = getattr(router, "weight", None)
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.shape[0] != lp.num_experts_out:
            raise MoepruneError(f"{adapter.family}: its router has no weight [experts, hidden] to refit; use "
                                "--compensate down")
        self.cfg, self.adapter, self.block, self.original = cfg, adapter, block, original
        self.held_out_sequences = held_out_sequences
        self.router = router
        self.has_bias = isinstance(getattr(router, "bias", None), torch.Tensor)
        self.q = kept_directions(W.shape[0], W.shape[1], cfg.router_features)
        self.ridge = RouterRidge(W.shape[0], self.q + self.has_bias)
        self.directions: torch.Tensor | None = None  # V [H, q], from the first fitted batch
        self.rule: str | None = None  # renormalised | softmax, from the first batch's gates
        self.held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (block input [b, L, H], y_ref [b·L, D])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, R] the router's logits over the kept experts for its inputs x [T, H]."""
        logits = x @ self.router.weight.float().T
        return logits + self.router.bias.float() if self.has_bias else logits

    def _gate_rule(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> str:
        """Which softmax rule the recorded gates follow; refused, in one line, when neither."""
        logits = self._logits(x)
        candidates = {"renormalised": torch.softmax(logits.gather(1, idx), dim=-1),
                      "softmax": torch.softmax(logits, dim=-1).gather(1, idx)}
        scale = w.float().norm().clamp(min=1e-12)
        errors = {rule: float((g - w.float()).norm() / scale) for rule, g in candidates.items()}
        rule = min(errors, key=errors.get)
        if not errors[rule] <= GATE_TOLERANCE:
            raise MoepruneError(f"{self.adapter.family}: its gates are not softmax probabilities of the "
                                "router's logits, renormalised over the selected experts or not (relative "
                                f"mismatch {errors[rule]:.2g}), which the router refit reads; use "
                                "--compensate down")
        return rule

    def _projected(self, x: torch.Tensor) -> torch.Tensor:
        """[T, q(+1)] x̃ = [Vᵀx, 1] of router inputs x [T, H]."""
        z = x @ self.directions.float()
        return torch.cat([z, torch.ones_like(z[:, :1])], 1) if self.has_bias else z

    @torch.no_grad()
    def add_batch(self, x_block: torch.Tensor, sequences: torch.Tensor, mine: list | None = None) -> None:
        from moeprune.methods.router_refit import principal_directions, router_features

        adapter = self.adapter
        (_, _, _, y_ref), (x_e, idx, w, y) = both_calls(adapter, self.original, self.block, x_block, mine)
        T, K = idx.shape
        x = x_block.reshape(T, -1).float()  # [T, H] what the router reads
        if self.rule is None:
            self.rule = self._gate_rule(x, idx, w)
        held = self.held_out_sequences(sequences)  # [B]
        if held.any():
            self.held.append((x_block[held.to(x_block.device)], y_ref.view(*x_block.shape[:2], -1)[
                held.to(y_ref.device)].reshape(-1, y_ref.shape[-1]).float().cpu()))
        fit = (~held.repeat_interleave(T // sequences.numel())).nonzero().squeeze(1).to(idx.device)  # [T']
        if fit.numel() == 0:
            return
        if self.directions is None:
            self.directions = principal_directions(x[fit].cpu(), self.q)
        D = y.shape[-1]
        moved = K if self.rule == "renormalised" else self.ridge.R  # rows each token moves
        chunk = max(1, 2 ** 22 // (moved * D))  # tokens per step: u [chunk, moved, D] stays small
        for rows in fit.split(chunk):
            sel = idx[rows]  # [t, K]
            outputs = adapter.expert_outputs(self.block, x_e[rows].repeat_interleave(K, 0), sel.reshape(-1))
            outputs = outputs.float().view(rows.numel(), K, D)  # [t, K, D]
            probabilities = torch.softmax(self._logits(x[rows]), dim=-1) if self.rule == "softmax" else None
            ids, u = router_features(self.rule, w[rows].float().cpu(), sel.cpu(), outputs.cpu(),
                                     None if probabilities is None else probabilities.cpu())
            self.ridge.add(self._projected(x[rows]).cpu(), ids, u, (y_ref[rows] - y[rows]).float().cpu())

    def _full(self, theta: torch.Tensor) -> torch.Tensor:
        """[R, H(+1)] the router change θ [R, q(+1)] in the router's own input space (ΔW = θ Vᵀ)."""
        if self.directions is None:  # nothing was fitted
            return torch.zeros(self.ridge.R, self.router.weight.shape[1] + self.has_bias, dtype=torch.float64)
        full = theta[:, : self.q] @ self.directions.T  # [R, H]
        return torch.cat([full, theta[:, self.q :]], 1) if self.has_bias else full

    def _router_tensors(self) -> list[torch.Tensor]:
        return [self.router.weight] + ([self.router.bias] if self.has_bias else [])

    def held_out_error(self) -> float:
        """Σ ||y_ref − y||² on the held-out sequences, with the block as it is now (real routing)."""
        total = 0.0
        for x_block, y_ref in self.held:
            with experts_calls(self.adapter, self.block) as calls:
                self.adapter.moe_forward(self.block, x_block)
            total += float(((y_ref.double() - calls[0][3].double().cpu()) ** 2).sum())
        return total

    @torch.no_grad()
    def finish(self) -> dict:
        from moeprune.surgery.compensation import add_to_router

        weights = [t.detach().clone() for t in self._router_tensors()]  # restored between tries

        def tried_with(theta: torch.Tensor | None) -> None:
            for t, saved in zip(self._router_tensors(), weights):
                t.copy_(saved)
            if theta is not None:
                add_to_router(self.adapter, self.block, theta)

        before = self.held_out_error()
        reference = sum(float((y ** 2).sum()) for _, y in self.held)
        best, previous, tried = (before, None, None), None, 0
        for alpha in sorted(self.cfg.alphas):
            theta = self._full(self.ridge.solve(alpha))
            tried_with(theta)
            err = self.held_out_error()
            tried += 1
            if err < best[0]:
                best = (err, alpha, theta)
            if self.cfg.alpha_search == "early" and previous is not None and err > previous:
                break
            previous = err
        err, alpha, theta = best
        applied = theta is not None
        tried_with(theta)
        notes = {"fit": "router", "gates": self.rule, "input_directions": self.q, "features": self.ridge.P,
                 "fit_tokens": self.ridge.tokens,
                 "held_out_tokens": sum(y.shape[0] for _, y in self.held), "alpha": alpha,
                 "alphas_tried": tried,
                 "held_out_error_before": before, "held_out_error_after": err, "applied": applied}
        if reference > 0:
            notes["held_out_relative_before"] = before / reference
            notes["held_out_relative_after"] = err / reference
        if not applied:
            notes["why_not"] = ("no held-out calibration tokens" if not self.held else
                                "no ridge strength lowered the held-out error")
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in notes.items()}
