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

The solve is joint over every kept expert when the feature width R·I (+ novices) is at most
`joint_limit`; beyond it each expert's block is solved on its own (the cross terms between experts
that share a token are dropped), which keeps the memory per layer at R·I² rather than (R·I)².

Regularisation: λ = α · mean(diag G) (G the normal matrix), α from the grid `alphas`. A share of the
calibration sequences (`holdout`) is held out: every α is scored on it, the best is kept, and a fit
whose held-out error is not below the error without any fit is not applied (the plan's notes say so).
Everything here is pure tensor arithmetic; `moeprune.pipeline.compensate` gathers the features and
`moeprune.surgery` writes the fitted tensors.

Shape letters: T tokens, S routed (token, slot) pairs, R kept experts, I expert width, D the experts'
output width, N novices, P = R·I + N fitted features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options

FITS = ("none", "down", "novices", "down+novices")
DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass(frozen=True)
class CompensationConfig:
    fit: str = "none"  # none | down | novices | down+novices (see the module docstring)
    holdout: float = 0.125  # share of calibration sequences held out to choose α and accept the fit
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # ridge strengths, relative to mean(diag G)
    joint_limit: int = 8192  # solve all kept experts jointly up to this many features, else per expert

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

    @property
    def active(self) -> bool:
        return self.fit != "none"

    @property
    def fits_down(self) -> bool:
        return self.fit in ("down", "down+novices")

    @property
    def fits_novices(self) -> bool:
        return self.fit in ("novices", "down+novices")


@dataclass
class RoutedPairs:
    """One batch of routed (token, slot) pairs of the compressed experts module, and its target.

    `hidden [S, I]` is `g · a(x)` of each kept pair (gate times the expert's hidden units); novice
    pairs carry only their gate. `target [T, D]` is the original output minus the compressed one.
    """

    tokens: torch.Tensor  # [S] token of each kept pair
    slots: torch.Tensor  # [S] kept expert (0..R-1) of each pair
    hidden: torch.Tensor  # [S, I] g · a
    novice_tokens: torch.Tensor  # [S'] token of each novice pair
    novice_slots: torch.Tensor  # [S'] novice (0..N-1)
    novice_gates: torch.Tensor  # [S'] g
    target: torch.Tensor  # [T, D]


class RidgeFit:
    """Streamed normal equations of one layer's compensation, then the regularised solve.

    `add(pairs, held_out)` accumulates a batch (fit share) or keeps it (held-out share, a small fixed
    part of the calibration set); `solve()` returns the fitted deltas and what the check found.
    """

    def __init__(self, cfg: CompensationConfig, num_kept: int, width: int, num_novices: int, dim: int):
        self.cfg = cfg
        self.R, self.I, self.N, self.D = num_kept, width, num_novices, dim
        self.fit_down, self.fit_novices = cfg.fits_down, cfg.fits_novices and num_novices > 0
        kept_width = self.R * self.I if self.fit_down else 0
        self.P = kept_width + (self.N if self.fit_novices else 0)
        self.joint = self.P <= cfg.joint_limit
        f64 = torch.float64
        if self.joint:
            self.G = torch.zeros(self.P, self.P, dtype=f64)  # Σ z zᵀ
            self.C = torch.zeros(self.P, self.D, dtype=f64)  # Σ z rᵀ
        else:  # one block per kept expert, and one for the novices
            self.G_e = torch.zeros(self.R if self.fit_down else 0, self.I, self.I, dtype=f64)
            self.C_e = torch.zeros(self.R if self.fit_down else 0, self.I, self.D, dtype=f64)
            self.G_n = torch.zeros(self.N if self.fit_novices else 0, self.N if self.fit_novices else 0,
                                   dtype=f64)
            self.C_n = torch.zeros(self.G_n.shape[0], self.D, dtype=f64)
        self.held_out: list[RoutedPairs] = []
        self.tokens = 0

    def features(self, p: RoutedPairs) -> torch.Tensor:
        """[T, P] z of every token of a batch (joint mode)."""
        T = p.target.shape[0]
        Z = torch.zeros(T, self.P, dtype=torch.float32)
        if self.fit_down and p.tokens.numel():
            cols = p.slots[:, None] * self.I + torch.arange(self.I)  # [S, I]
            Z.index_put_((p.tokens[:, None].expand_as(cols), cols), p.hidden.float(), accumulate=True)
        if self.fit_novices and p.novice_tokens.numel():
            base = self.R * self.I if self.fit_down else 0
            Z.index_put_((p.novice_tokens, base + p.novice_slots), p.novice_gates.float(), accumulate=True)
        return Z

    def add(self, p: RoutedPairs, held_out: bool) -> None:
        if held_out:
            self.held_out.append(p)
            return
        self.tokens += p.target.shape[0]
        r = p.target.float()  # [T, D]
        if self.joint:
            Z = self.features(p)  # [T, P]
            self.G += (Z.T @ Z).double()
            self.C += (Z.T @ r).double()
            return
        if self.fit_down:
            for s in range(self.R):
                rows = p.slots == s
                if not rows.any():
                    continue
                A = p.hidden[rows].float()  # [S_s, I]
                self.G_e[s] += (A.T @ A).double()
                self.C_e[s] += (A.T @ r[p.tokens[rows]]).double()
        if self.fit_novices:
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
        A = G + alpha * scale * torch.eye(G.shape[0], dtype=G.dtype)
        return torch.linalg.solve(A, C)

    def _solution(self, alpha: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ΔW [R, D, I] or None, novice vectors' deltas [N, D] or None) for one α."""
        if self.joint:
            theta = self._ridge(self.G, self.C, alpha)  # [P, D]
            kept = theta[: self.R * self.I] if self.fit_down else None
            nov = theta[self.R * self.I :] if self.fit_down else theta
            dW = kept.view(self.R, self.I, self.D).transpose(1, 2) if kept is not None else None
            return dW, (nov if self.fit_novices else None)
        dW = None
        if self.fit_down:
            dW = torch.stack([self._ridge(self.G_e[s], self.C_e[s], alpha) for s in range(self.R)])
            dW = dW.transpose(1, 2)  # [R, D, I]
        dn = self._ridge(self.G_n, self.C_n, alpha) if self.fit_novices else None
        return dW, dn

    def held_out_error(self, dW: torch.Tensor | None, dn: torch.Tensor | None) -> float:
        """Σ ||r - Δy||² over the held-out tokens with these deltas (both None: no fit)."""
        total = 0.0
        for p in self.held_out:
            change = torch.zeros_like(p.target, dtype=torch.float64)  # [T, D]
            if dW is not None and p.tokens.numel():
                per_pair = torch.einsum("sdi,si->sd", dW[p.slots], p.hidden.double())  # [S, D]
                change.index_add_(0, p.tokens, per_pair)
            if dn is not None and p.novice_tokens.numel():
                change.index_add_(0, p.novice_tokens, dn[p.novice_slots] * p.novice_gates.double()[:, None])
            total += float(((p.target.double() - change) ** 2).sum())
        return total

    def solve(self) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """(ΔW [R, D, I], Δnovices [N, D], notes): the best α on the held-out tokens, or no fit at all
        (both None) when none beats leaving the layer as it is."""
        before = self.held_out_error(None, None)
        best = None
        errors = {}
        for alpha in self.cfg.alphas:
            dW, dn = self._solution(alpha)
            err = self.held_out_error(dW, dn)
            errors[f"{alpha:g}"] = err
            if best is None or err < best[0]:
                best = (err, alpha, dW, dn)
        err, alpha, dW, dn = best
        held_out_tokens = sum(p.target.shape[0] for p in self.held_out)
        applied = held_out_tokens > 0 and err < before
        notes = {"fit": self.cfg.fit, "solve": "joint" if self.joint else "per expert",
                 "features": self.P, "fit_tokens": self.tokens, "held_out_tokens": held_out_tokens,
                 "alpha": alpha, "held_out_error_before": before, "held_out_error_after": err,
                 "applied": applied}
        if not applied:
            notes["why_not"] = ("no held-out calibration tokens" if not held_out_tokens else
                                "the fit did not lower the held-out error")
            return None, None, notes
        return dW, dn, notes
