"""Closed-form compensation after a layer is compressed: ridge fits of its output to the original's.

After a layer plan is applied, the compressed experts module's output on the calibration tokens
differs from the original's: pruned experts are gone and tokens re-select among the survivors with
new gates. Compensation fits part of the compressed layer, in closed form, so that its output
matches the *original* layer's output on the same inputs (the inputs come out of the already
compressed earlier layers: compensation runs the walk sequentially). No gradients, no training
loop: one ridge regression per layer, its normal equations streamed over the calibration batches.

What can be fitted (`CompensationConfig.fit`):

- ``down``: the kept experts' down projections. Expert s's output is `W_s a_s(x)` with
  `a_s(x) = act(gate_s x) * up_s x` [I]; the experts module outputs `Σ_k g_k W_{s_k} a_{s_k}(x)`.
  With the router and the up/gate projections fixed, that output is linear in the down projections,
  so `ΔW = argmin Σ_t ||r_t - Σ_k g_tk ΔW_{s_tk} a_tk||² + λ||ΔW||²` (r: original minus compressed
  output) is a ridge regression on the features `z_t = [Σ_k [s_tk = s] g_tk a_tk]_s` [R·I]. The
  output is a plain stock checkpoint (only the down tensors change), which vLLM loads.
- ``novices``: MoNE's novice vectors, fitted jointly (features: the novice's gate `g_tn`) instead of
  each being its expert's mean output, which is optimal only for that expert alone.
- ``down+novices``: both, jointly.
- ``lowrank``: low-rank novices. Novice n becomes `b_n + U_n V_nᵀ x` (x [D]: what the experts module
  received, U_n, V_n [D, r], r = `rank`) instead of the constant b_n; its change on token t is
  `g_tn (Δb_n + W_n x_t)` with `W_n = U_n V_nᵀ` of rank r. The fit is reduced-rank ridge regression
  (Mukherjee & Zhu 2011, "Reduced rank ridge regression and its kernel extensions"), read as:
  (1) a ridge fit of the full-rank affine map `[Δb_n, W_n]` on the features `g_tn [1, x_t]` [D+1]
  (every novice's block jointly with the rest when the width allows, see below);
  (2) per novice, the bias eliminated (its rows of the normal matrix give the g²-weighted centred
  input moment `Σ_n = S - m mᵀ/s`, s = Σ g², m = Σ g² x, S = Σ g² x xᵀ), the fitted linear map's
  outputs' second moment on the ridge-augmented data `M_n = Ŵ_n (Σ_n + λI) Ŵ_nᵀ` [D, D], and its
  top-r eigenvectors P_r [D, r]: `W_n,r = P_r P_rᵀ Ŵ_n`, i.e. `U_n = P_r`, `V_n = Ŵ_nᵀ P_r` (Mukherjee
  & Zhu's step: project the ridge fit onto the top-r principal directions of its fitted values;
  without the ridge, Izenman's reduced-rank regression);
  (3) the unconstrained parameters (the biases, and the down deltas with ``down+lowrank``) solved
  again with the truncated maps held fixed, which the rank step made stale. With one novice and its
  own block this is the exact reduced-rank ridge solution with a free intercept; with several novices
  solved jointly, step (2) uses each novice's own block (the cross terms only enter (1) and (3)).
  Stock transformers cannot represent `b + U Vᵀ x` (a SwiGLU expert's output is not affine in x), so
  the checkpoint is moeprune's novice format; `export-stock` drops every novice, low-rank or not.
  A novice holds D + 2·D·r parameters instead of D.
- ``down+lowrank``: the down projections and the low-rank novices, jointly as in (1) and (3).
- ``router``: the kept router rows (and bias), by one linearised ridge step scored on the held-out
  tokens with the real routing (`moeprune.methods.router_refit`); a stock checkpoint.
- ``router+down``: the router refit, then the down projections fitted on the routing it gives (two
  passes over the calibration batches).

The solve is joint over every kept expert when the feature width R·I (+ novices) is at most
`joint_limit`; beyond it each expert's block is solved on its own (the cross terms between experts
that share a token are dropped), which keeps the memory per layer at R·I² rather than (R·I)². Low-rank
novices count D+1 features each; beyond the limit each novice's block [D+1, D+1] is solved on its own
(memory N·(D+1)² doubles per layer, streamed over the batches).

Regularisation: λ = α · mean(diag G) (G the normal matrix), α from the grid `alphas`. A share of the
calibration sequences (`holdout`) is held out: the α are scored on it, the best is kept, and a fit
whose held-out error is not below the error without any fit is not applied (the plan's notes say so).
With `alpha_search="early"` (the default) the grid is walked from the smallest α up and stops at the
first α whose held-out error is higher than the one before: a ridge path's held-out error is
usually unimodal in α, and on the testbeds the best α is the smallest or next to it, so this solves 2-3
systems instead of 6. `alpha_search="full"` scores every α.
Everything here is pure tensor arithmetic; `moeprune.pipeline.compensate` gathers the features and
`moeprune.surgery` writes the fitted tensors.

Shape letters: T tokens, S routed (token, slot) pairs, R kept experts, I expert width, D the experts'
output width (and input width), N novices, B features per novice (1, or D+1 for low-rank ones),
P = R·I + N·B fitted features, r the low-rank novices' rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options

FITS = ("none", "down", "novices", "down+novices", "lowrank", "down+lowrank", "router", "router+down")
DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass(frozen=True)
class CompensationConfig:
    fit: str = "none"  # none | down | novices | down+novices | lowrank | down+lowrank | router | router+down
    holdout: float = 0.125  # share of calibration sequences held out to choose α and accept the fit
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # ridge strengths, relative to mean(diag G)
    joint_limit: int = 8192  # solve all kept experts jointly up to this many features, else per expert
    rank: int = 8  # r of the low-rank novices (fit lowrank, down+lowrank); capped at D
    alpha_search: str = "early"  # early: stop at the first α whose held-out error rises; full: every α
    router_features: int = 1024  # router refit: kept rows × input directions at most (`router_refit`)
    # False when chosen by default (`--compensate auto`): a prune it cannot run goes on without it, and a
    # layer it cannot fit says why in its notes, instead of refusing
    required: bool = True

    def __post_init__(self):
        options.one_of("compensation", "fit", self.fit, FITS)
        options.number("compensation", "holdout", self.holdout, minimum=0.0, strict=True)
        if not self.holdout < 0.5:
            raise MoepruneError(f"compensation option holdout={self.holdout!r} is out of range; give a "
                                "share of the calibration sequences in (0, 0.5)")
        if not self.alphas:
            raise MoepruneError("compensation option alphas is empty; give at least one ridge strength > 0")
        for a in self.alphas:
            options.number("compensation", "alphas", a, minimum=0.0, strict=True)
        options.integer("compensation", "joint_limit", self.joint_limit, 1)
        options.integer("compensation", "rank", self.rank, 1)
        options.one_of("compensation", "alpha_search", self.alpha_search, ("early", "full"))
        options.integer("compensation", "router_features", self.router_features, 1)

    def accumulator_bytes(self, num_kept: int, width: int, dim: int, num_novices: int,
                          router_width: int = 0) -> int:
        """Bytes of one layer's normal equations (float64), as `RidgeFit` (and, for a router refit with
        router_width inputs, `RouterRidge`) will hold them; the larger of the two, as they run in turn."""
        if self.fits_router:
            from moeprune.methods.router_refit import RouterRidge, kept_directions

            rest = self.without_router
            q = kept_directions(num_kept, router_width, self.router_features)
            router = RouterRidge.accumulator_bytes(num_kept, q + 1)
            after = rest.accumulator_bytes(num_kept, width, dim, num_novices) if rest.active else 0
            return max(router, after)
        kept_width = num_kept * width if self.fits_down else 0
        per_novice = (dim + 1) if self.low_rank else 1
        novices = num_novices * per_novice if self.fits_novices else 0
        P = kept_width + novices
        if P <= self.joint_limit:
            return 8 * (P * P + P * dim)
        blocks = (num_kept * (width * width + width * dim) if self.fits_down else 0)
        return 8 * (blocks + num_novices * (per_novice * per_novice + per_novice * dim))

    @property
    def active(self) -> bool:
        return self.fit != "none"

    @property
    def fits_down(self) -> bool:
        return self.fit in ("down", "down+novices", "down+lowrank", "router+down")

    @property
    def fits_novices(self) -> bool:
        return self.fit in ("novices", "down+novices", "lowrank", "down+lowrank")

    @property
    def fits_router(self) -> bool:
        """The kept router rows are refitted first (`moeprune.methods.router_refit`)."""
        return self.fit in ("router", "router+down")

    @property
    def without_router(self) -> CompensationConfig:
        """The fit of the kept experts (or novices) that follows a router refit."""
        return dataclasses.replace(self, fit=self.fit.removeprefix("router").removeprefix("+") or "none")

    @property
    def low_rank(self) -> bool:
        return self.fit in ("lowrank", "down+lowrank")


@dataclass
class RoutedPairs:
    """One batch of routed (token, slot) pairs of the compressed experts module, and its target.

    `hidden [S, I]` is `g · a(x)` of each kept pair (gate times the expert's hidden units); novice
    pairs carry their gate, and for low-rank fits the experts' input x of their token. `target [T, D]`
    is the original output minus the compressed one.
    """

    tokens: torch.Tensor  # [S] token of each kept pair
    slots: torch.Tensor  # [S] kept expert (0..R-1) of each pair
    hidden: torch.Tensor  # [S, I] g · a
    novice_tokens: torch.Tensor  # [S'] token of each novice pair
    novice_slots: torch.Tensor  # [S'] novice (0..N-1)
    novice_gates: torch.Tensor  # [S'] g
    target: torch.Tensor  # [T, D]
    novice_inputs: torch.Tensor | None = None  # [S', D] x of each novice pair (low-rank fits only)


class LowRankDelta(NamedTuple):
    """A low-rank novice fit: novice n's output becomes `b_n + bias[n] + up[n] @ (down[n].T @ x)`."""

    bias: torch.Tensor  # [N, D] added to the novice vectors
    up: torch.Tensor  # [N, D, r] U
    down: torch.Tensor  # [N, D, r] V


class RidgeFit:
    """Streamed normal equations of one layer's compensation, then the regularised solve.

    `add(pairs, held_out)` accumulates a batch (fit share) or keeps it (held-out share, a small fixed
    part of the calibration set); `solve()` returns the fitted deltas and what the check found.
    """

    def __init__(self, cfg: CompensationConfig, num_kept: int, width: int, num_novices: int, dim: int):
        self.cfg = cfg
        self.R, self.I, self.N, self.D = num_kept, width, num_novices, dim
        self.fit_down, self.fit_novices = cfg.fits_down, cfg.fits_novices and num_novices > 0
        self.low_rank = self.fit_novices and cfg.low_rank
        self.rank = min(cfg.rank, dim)
        self.B = dim + 1 if self.low_rank else 1  # features per novice: g [1, x], or g
        self.kept_width = self.R * self.I if self.fit_down else 0
        self.P = self.kept_width + (self.N * self.B if self.fit_novices else 0)
        self.joint = self.P <= cfg.joint_limit
        f64 = torch.float64
        if self.joint:
            self.G = torch.zeros(self.P, self.P, dtype=f64)  # Σ z zᵀ
            self.C = torch.zeros(self.P, self.D, dtype=f64)  # Σ z rᵀ
        else:  # one block per kept expert, and one for the novices (one per low-rank novice)
            self.G_e = torch.zeros(self.R if self.fit_down else 0, self.I, self.I, dtype=f64)
            self.C_e = torch.zeros(self.R if self.fit_down else 0, self.I, self.D, dtype=f64)
            n = self.N if self.fit_novices else 0
            if self.low_rank:
                self.G_n = torch.zeros(n, self.B, self.B, dtype=f64)
                self.C_n = torch.zeros(n, self.B, self.D, dtype=f64)
            else:
                self.G_n = torch.zeros(n, n, dtype=f64)
                self.C_n = torch.zeros(n, self.D, dtype=f64)
        self.held_out: list[RoutedPairs] = []
        self.tokens = 0
        # sums a tensor over the calibration processes (torchrun) so that every process solves the same
        # system; the identity in one process
        self.combine = lambda t: t

    def _novice_features(self, p: RoutedPairs) -> torch.Tensor:
        """[S', B] each novice pair's features: g, or g [1, x] for low-rank novices."""
        g = p.novice_gates.float()[:, None]  # [S', 1]
        if not self.low_rank:
            return g
        if p.novice_inputs is None:
            raise ValueError("low-rank novice fits need the novice pairs' inputs (RoutedPairs.novice_inputs)")
        return g * torch.cat([torch.ones_like(g), p.novice_inputs.float()], dim=1)

    def features(self, p: RoutedPairs) -> torch.Tensor:
        """[T, P] z of every token of a batch (joint mode)."""
        T = p.target.shape[0]
        Z = torch.zeros(T, self.P, dtype=torch.float32)
        if self.fit_down and p.tokens.numel():
            cols = p.slots[:, None] * self.I + torch.arange(self.I)  # [S, I]
            Z.index_put_((p.tokens[:, None].expand_as(cols), cols), p.hidden.float(), accumulate=True)
        if self.fit_novices and p.novice_tokens.numel():
            cols = self.kept_width + p.novice_slots[:, None] * self.B + torch.arange(self.B)  # [S', B]
            Z.index_put_((p.novice_tokens[:, None].expand_as(cols), cols), self._novice_features(p),
                         accumulate=True)
        return Z

    def _add_gram(self, Z: torch.Tensor, p: RoutedPairs, r: torch.Tensor) -> None:
        """G += Zᵀ Z and C += Zᵀ r, one row block (a kept expert's I, a novice's B) at a time over the
        tokens routed to it only: Z is zero elsewhere, so this costs T·K·block·(P + D), not T·P·(P + D).
        Only the blocks on and right of the diagonal are accumulated (half the flops); `_symmetrise` fills
        the rest before solving."""
        blocks = []
        if self.fit_down:
            blocks += [(s * self.I, self.I, p.tokens[p.slots == s]) for s in range(self.R)]
        if self.fit_novices:
            blocks += [(self.kept_width + n * self.B, self.B, p.novice_tokens[p.novice_slots == n])
                       for n in range(self.N)]
        for start, width, tokens in blocks:
            if tokens.numel() == 0:
                continue
            seen = tokens.unique()
            rows = Z[seen, start:]  # [n_b, P - start] the tokens with a nonzero in this block
            block = rows[:, :width]  # [n_b, width]
            self.G[start : start + width, start:] += (block.T @ rows).double()
            self.C[start : start + width] += (block.T @ r[seen]).double()

    def _symmetrise(self) -> None:
        """G's blocks left of the diagonal from those right of it (`_add_gram` accumulates the upper half)."""
        if self.joint and not getattr(self, "_symmetric", False):
            upper = torch.triu(self.G)
            self.G = upper + torch.triu(upper, diagonal=1).T
            self._symmetric = True

    def _combine(self) -> None:
        """Every process's normal equations, token counts added (`combine`), once, before solving."""
        if getattr(self, "_combined", False):
            return
        names = ("G", "C") if self.joint else ("G_e", "C_e", "G_n", "C_n")
        for name in names:
            setattr(self, name, self.combine(getattr(self, name)))
        self.tokens = int(self.combine(torch.tensor(float(self.tokens), dtype=torch.float64)))
        self._combined = True

    def add(self, p: RoutedPairs, held_out: bool) -> None:
        if held_out:
            self.held_out.append(p)
            return
        self.tokens += p.target.shape[0]
        r = p.target.float()  # [T, D]
        if self.joint:
            Z = self.features(p)  # [T, P]
            self._add_gram(Z, p, r)
            return
        if self.fit_down:
            for s in range(self.R):
                rows = p.slots == s
                if not rows.any():
                    continue
                A = p.hidden[rows].float()  # [S_s, I]
                self.G_e[s] += (A.T @ A).double()
                self.C_e[s] += (A.T @ r[p.tokens[rows]]).double()
        if self.fit_novices and self.low_rank:
            F = self._novice_features(p)  # [S', D+1]
            for n in p.novice_slots.unique().tolist():
                rows = p.novice_slots == n
                self.G_n[n] += (F[rows].T @ F[rows]).double()
                self.C_n[n] += (F[rows].T @ r[p.novice_tokens[rows]]).double()
        elif self.fit_novices:
            Zn = torch.zeros(r.shape[0], self.N)
            Zn.index_put_((p.novice_tokens, p.novice_slots), p.novice_gates.float(), accumulate=True)
            self.G_n += (Zn.T @ Zn).double()
            self.C_n += (Zn.T @ r).double()

    # ---- solving -------------------------------------------------------------------------------
    @staticmethod
    def _ridge(G: torch.Tensor, C: torch.Tensor, alpha: float) -> torch.Tensor:
        """[p, D] argmin ||r - Zθ||² + λ||θ||², λ = α · mean(diag G); zero for an empty block."""
        scale = G.diagonal().mean()
        if not scale > 0:
            return torch.zeros_like(C)
        A = G.clone()
        A.diagonal().add_(alpha * scale)
        return torch.linalg.solve(A, C)

    def _joint_ridge(self, alpha: float) -> torch.Tensor:
        """`_ridge(G, C, α)` of the joint system by a Cholesky factorisation of G + λI: P³/3 flops per α,
        where one eigendecomposition shared by the grid costs about 9P³ (a grid of 6 is 4x cheaper so)."""
        scale = self.G.diagonal().mean()
        if not scale > 0:
            return torch.zeros_like(self.C)
        A = self.G.clone()
        A.diagonal().add_(alpha * scale)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:  # not positive definite in floating point (λ tiny against G's spread)
            return torch.linalg.solve(A, self.C)
        return torch.cholesky_solve(self.C, L)

    def _reduce_rank(self, G: torch.Tensor, theta: torch.Tensor,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Step (2) of the low-rank reading for one novice: its block G [D+1, D+1] (features g [1, x]), its
        ridge fit theta [D+1, D] and the ridge's λ -> (V [D, r], U [D, r]) with W_r = U Vᵀ (zero for a
        novice never routed)."""
        s, m, S = G[0, 0], G[1:, 0], G[1:, 1:]
        D, r = self.D, self.rank
        if not s > 0:
            z = torch.zeros(D, r, dtype=G.dtype)
            return z, z.clone()
        centred = S - torch.outer(m, m) / s  # [D, D] g²-weighted centred input moment
        W_t = theta[1:]  # [D_in, D_out] Ŵᵀ
        M = W_t.T @ (centred + lam * torch.eye(D, dtype=G.dtype)) @ W_t  # [D_out, D_out]
        _, vecs = torch.linalg.eigh((M + M.T) / 2)  # ascending eigenvalues
        U = vecs[:, -r:].flip(1)  # [D, r] top-r directions of the fitted values
        return W_t @ U, U  # V [D_in, r], U [D_out, r]

    def _refit_free(self, G: torch.Tensor, C: torch.Tensor, theta: torch.Tensor, fixed: torch.Tensor,
                    alpha: float, with_down: bool) -> torch.Tensor:
        """Step (3): theta [p, D] with its `fixed` rows (bool [p]) kept and the others solved again on the
        normal equations G [p, p], C [p, D] given them: by ridge when down projections are among them,
        else (the biases alone) by least squares."""
        free = ~fixed
        if not free.any():
            return theta
        out = theta.clone()
        Gf = G[free][:, free]
        Cf = C[free] - G[free][:, fixed] @ theta[fixed]
        out[free] = self._ridge(Gf, Cf, alpha) if with_down else self._bias_solve(Gf, Cf)
        return out

    @staticmethod
    def _bias_solve(G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """The biases given the maps: plain least squares (the intercept of reduced-rank regression is
        free), on the novices that were routed (the others stay zero)."""
        out = torch.zeros_like(C)
        seen = G.diagonal() > 0
        if seen.any():
            out[seen] = torch.linalg.lstsq(G[seen][:, seen], C[seen]).solution
        return out

    def _low_rank_blocks(self, G: torch.Tensor, C: torch.Tensor, theta: torch.Tensor, base: int, count: int,
                         alpha: float, with_down: bool = False) -> tuple[torch.Tensor, LowRankDelta]:
        """Steps (2) and (3) on the ridge solution theta [P, D] of G, C, whose `count` novice blocks start
        at row `base`.

        Returns theta with the novice maps' rows replaced by their rank-r truncation and the free rows
        solved again, and the low-rank factors."""
        lam = float(alpha * G.diagonal().mean())  # the ridge's λ (`_ridge`)
        U = torch.zeros(count, self.D, self.rank, dtype=G.dtype)
        V = torch.zeros_like(U)
        theta = theta.clone()
        fixed = torch.zeros(G.shape[0], dtype=torch.bool)
        for n in range(count):
            lo = base + n * self.B
            blk = slice(lo, lo + self.B)
            V[n], U[n] = self._reduce_rank(G[blk, blk], theta[blk], lam)
            theta[lo + 1 : lo + self.B] = V[n] @ U[n].T  # [D_in, D_out] (U Vᵀ)ᵀ
            fixed[lo + 1 : lo + self.B] = True
        theta = self._refit_free(G, C, theta, fixed, alpha, with_down)
        bias = theta[base : base + count * self.B].view(count, self.B, self.D)[:, 0]
        return theta, LowRankDelta(bias, U, V)

    def _solution(self, alpha: float):
        """(ΔW [R, D, I] or None, novices' deltas or None) for one α; the novices' delta is a tensor
        [N, D] for constant novices, a `LowRankDelta` for low-rank ones."""
        if self.joint:
            theta = self._joint_ridge(alpha)  # [P, D]
            dn = None
            if self.low_rank:
                theta, dn = self._low_rank_blocks(self.G, self.C, theta, self.kept_width, self.N, alpha,
                                                  self.fit_down)
            elif self.fit_novices:
                dn = theta[self.kept_width :]
            kept = theta[: self.kept_width] if self.fit_down else None
            dW = kept.view(self.R, self.I, self.D).transpose(1, 2) if kept is not None else None
            return dW, dn
        dW = None
        if self.fit_down:
            dW = torch.stack([self._ridge(self.G_e[s], self.C_e[s], alpha) for s in range(self.R)])
            dW = dW.transpose(1, 2)  # [R, D, I]
        if self.low_rank:
            parts = [self._low_rank_blocks(G, C, self._ridge(G, C, alpha), 0, 1, alpha)[1]
                     for G, C in zip(self.G_n, self.C_n)]
            dn = LowRankDelta(*(torch.cat([getattr(p, f) for p in parts]) for f in LowRankDelta._fields))
            return dW, dn
        dn = self._ridge(self.G_n, self.C_n, alpha) if self.fit_novices else None
        return dW, dn

    def held_out_error(self, dW: torch.Tensor | None, dn) -> float:
        """Σ ||r - Δy||² over the held-out tokens with these deltas (both None: no fit)."""
        total = 0.0
        for p in self.held_out:
            change = torch.zeros_like(p.target, dtype=torch.float64)  # [T, D]
            if dW is not None and p.tokens.numel():
                for s in p.slots.unique().tolist():  # an expert at a time: no [S, D, I] copy of dW
                    rows = (p.slots == s).nonzero().squeeze(1)
                    change.index_add_(0, p.tokens[rows], p.hidden[rows].double() @ dW[s].T)  # [S_s, D]
            if dn is not None and p.novice_tokens.numel():
                g = p.novice_gates.double()[:, None]  # [S', 1]
                if isinstance(dn, LowRankDelta):
                    per_pair = dn.bias[p.novice_slots].clone()  # [S', D]
                    for n in p.novice_slots.unique().tolist():  # a novice at a time: no [S', D, r] copy
                        rows = (p.novice_slots == n).nonzero().squeeze(1)
                        x = p.novice_inputs[rows].double()  # [S_n, D]
                        per_pair[rows] += (x @ dn.down[n]) @ dn.up[n].T  # U (Vᵀx)
                else:
                    per_pair = dn[p.novice_slots]
                change.index_add_(0, p.novice_tokens, per_pair * g)
            total += float(((p.target.double() - change) ** 2).sum())
        return float(self.combine(torch.tensor(total, dtype=torch.float64)))

    def solve(self):
        """(ΔW [R, D, I], Δnovices, notes): the best α on the held-out tokens, or no fit at all (both None)
        when none beats leaving the layer as it is. Δnovices is [N, D] for constant novices and a
        `LowRankDelta` for low-rank ones."""
        self._combine()
        self._symmetrise()
        before = self.held_out_error(None, None)
        best = None
        previous = None
        alphas = sorted(self.cfg.alphas)
        tried = []
        for alpha in alphas:
            dW, dn = self._solution(alpha)
            err = self.held_out_error(dW, dn)
            tried.append(alpha)
            if best is None or err < best[0]:
                best = (err, alpha, dW, dn)
            if self.cfg.alpha_search == "early" and previous is not None and err > previous:
                break
            previous = err
        err, alpha, dW, dn = best
        held_out_tokens = int(self.combine(torch.tensor(float(sum(p.target.shape[0] for p in self.held_out)),
                                                        dtype=torch.float64)))
        applied = held_out_tokens > 0 and err < before
        notes = {"fit": self.cfg.fit, "solve": "joint" if self.joint else "per expert",
                 "features": self.P, "fit_tokens": self.tokens, "held_out_tokens": held_out_tokens,
                 "alpha": alpha, "alphas_tried": len(tried), "held_out_error_before": before,
                 "held_out_error_after": err,
                 "applied": applied}
        if self.low_rank:
            notes["novice_rank"] = self.rank
        if not applied:
            notes["why_not"] = ("no held-out calibration tokens" if not held_out_tokens else
                                "the fit did not lower the held-out error")
            return None, None, notes
        return dW, dn, notes
