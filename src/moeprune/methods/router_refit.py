"""Router refit after pruning: the kept router rows refitted so that the compressed layer's output
approaches the original's (`--compensate router`, `router+down`).

After pruning, tokens re-select among the surviving experts and their gates change. The issue that
asked for this read it as the main loss of a stock checkpoint (MoNE's kept set costs far less with the
router left whole than sliced). This fit changes the only stock tensors that set the routing: the
kept rows of the router's weight (and its bias, where the router has one).

The gates are not linear in the router rows, so the fit is one Gauss-Newton step, in closed form:

- The routing is held as it is (each token's selected experts S_t); the experts module outputs
  `y_t = Σ_{k∈S_t} w_tk E_k(x_t)` with `w_t = softmax(l_t[S_t])` (softmax over the selected logits, which
  is every family whose top-k gates are renormalised softmax probabilities: Mixtral, Qwen3-MoE, MiniMax,
  gpt-oss).
- A change δl of the logits moves the output by `Σ_k v_tk δl_tk` to first order, with
  `v_tk = w_tk (E_k(x_t) − y_t)` [D] (the softmax Jacobian `w_k(δ_kj − w_j)` applied to the outputs).
- The logits are `l = W x (+ b)`, so with `θ_j` the change of kept router row j (and its bias, on a
  constant input 1), `Δy_t = Σ_k v_tk (θ_{s_tk} · x_t)`: linear in θ [R, H(+1)].
- `θ = argmin Σ_t ||r_t − Δy_t||² + λ||θ||²`, r the original layer's experts output minus the compressed
  one: a ridge regression with normal equations
  `G[(j,a),(j',b)] = Σ_t Σ_{k,k'} [s_tk=j][s_tk'=j'] (v_tk·v_tk') x_ta x_tb` and
  `C[(j,a)] = Σ_t Σ_k [s_tk=j] (v_tk·r_t) x_ta`, streamed over batches in float64.

A linear step can overshoot, and a new router also changes which experts are selected, which the
linearisation does not see. So every ridge strength is scored on the held-out calibration tokens by
running the block with the new router for real (`moeprune.pipeline.compensate`), the best is kept, and
the refit is not applied when none lowers the real held-out error. With `router+down` the down
projections are then fitted (`moeprune.methods.compensation`) on the routing the new router gives.

The unknowns are R·(H+1) with one joint system, so the refit holds (R·(H+1))² float64 numbers per layer:
small on the testbeds, out of reach at full size (128 kept experts × 7168 inputs: 6.7 TB), where it is
refused before calibration. Families whose gates are not renormalised softmax probabilities of the
router's linear logits are refused on the first batch (the gates are recomputed and compared).

Shape letters: T tokens, K experts per token, R kept experts, H the router's input width (+1 with a
bias), D the experts' output width.
"""

from __future__ import annotations

import torch

GATE_TOLERANCE = 1e-3  # relative: the recorded gates must be softmax(l[S]) of the router's own logits


def router_features(w: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """[T, K, D] v_tk = w_tk (E_k(x_t) − Σ_k' w_tk' E_k'(x_t)): how the output moves per unit of logit k.

    w [T, K] gates, outputs [T, K, D] raw outputs of the selected experts."""
    mixed = (w[..., None] * outputs).sum(1, keepdim=True)  # [T, 1, D]
    return w[..., None] * (outputs - mixed)


class RouterRidge:
    """Streamed normal equations of the linearised router refit (module docstring), then the ridge solves."""

    def __init__(self, num_kept: int, width: int):
        self.R, self.H = num_kept, width
        self.P = num_kept * width
        self.G = torch.zeros(num_kept, num_kept, width, width, dtype=torch.float64)  # [j, j', a, b]
        self.C = torch.zeros(num_kept, width, dtype=torch.float64)
        self.tokens = 0

    @staticmethod
    def accumulator_bytes(num_kept: int, width: int) -> int:
        P = num_kept * width
        return 8 * (2 * P * P + P)  # G, and the factor of G + λI

    def add(self, x: torch.Tensor, selected: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> None:
        """One batch: router inputs x [T, H], selected kept rows [T, K], features v [T, K, D], target
        r [T, D]."""
        T, K = selected.shape
        self.tokens += T
        x = x.float()
        m = torch.einsum("tkd,tld->tkl", v, v).reshape(-1)  # [T·K·K] v_tk · v_tk'
        c = torch.einsum("tkd,td->tk", v, r)  # [T, K]
        self.C.index_add_(0, selected.reshape(-1), (x.repeat_interleave(K, 0) * c.reshape(-1, 1)).double())
        pair = (selected[:, :, None] * self.R + selected[:, None, :]).reshape(-1)  # [T·K·K] block (j, j')
        token = torch.arange(T).repeat_interleave(K * K)
        G = self.G.view(self.R * self.R, self.H, self.H)
        order = torch.argsort(pair)
        pairs, counts = torch.unique_consecutive(pair[order], return_counts=True)
        for p, rows in zip(pairs.tolist(), torch.split(order, counts.tolist())):  # one block at a time
            X = x[token[rows]]  # [n, H]
            G[p] += ((X * m[rows, None]).T @ X).double()

    def solve(self, alpha: float) -> torch.Tensor:
        """θ [R, H] for the ridge strength α · mean(diag G) (zero when nothing was routed)."""
        A = self.G.permute(0, 2, 1, 3).reshape(self.P, self.P).clone()  # [(j, a), (j', b)]
        scale = A.diagonal().mean()
        if not scale > 0:
            return torch.zeros(self.R, self.H, dtype=torch.float64)
        A.diagonal().add_(alpha * scale)
        L, info = torch.linalg.cholesky_ex(A)
        b = self.C.reshape(self.P, 1)
        theta = torch.linalg.solve(A, b) if int(info) != 0 else torch.cholesky_solve(b, L)
        return theta.view(self.R, self.H)
