"""Router refit after pruning: the kept router rows refitted so that the compressed layer's output
approaches the original's (`--compensate router`, `router+down`).

After pruning, tokens re-select among the surviving experts and their gates change. The issue that
asked for this read it as the main loss of a stock checkpoint (MoNE's kept set costs far less with the
router left whole than sliced). This fit changes the only stock tensors that set the routing: the
kept rows of the router's weight (and its bias, where the router has one).

The gates are not linear in the router rows, so the fit is one Gauss-Newton step, in closed form:

- The routing is held as it is (each token's selected experts S_t); the experts module outputs
  `y_t = Σ_{k∈S_t} w_tk E_k(x_t)`. Two softmax gate rules are read (the first batch tells which one the
  family follows, by recomputing the gates from the router's own logits l_t over the kept experts):
  `renormalised`, `w_t = softmax(l_t[S_t])` (Mixtral, Qwen3-MoE, MiniMax, gpt-oss), and `softmax`,
  `w_tk = softmax(l_t)_k` over every kept expert, not renormalised (Qwen2-MoE without
  `norm_topk_prob`, DeepSeek-V2, Jamba). The second is the issue's case: slicing the router inflates
  every surviving gate, and raising the logits of kept experts a token does not select is the only way
  a stock router can take that mass back.
- A change δl of the logits moves the output by `Σ_j u_tj δl_tj` to first order: renormalised,
  `u_tj = [j∈S_t] w_tj (E_j(x_t) − y_t)`; softmax, `u_tj = p_tj ([j∈S_t] E_j(x_t) − y_t)` for every
  kept j (p = softmax(l_t)), so every kept row moves.
- The logits are `l = W x (+ b)`. With θ_j the change of kept row j, restricted to the span of the
  router inputs' top q principal directions V [H, q] (`ΔW_j = θ_j Vᵀ`; q = H when R·H is at most
  `max_features`, else `max_features // R`), and the bias on a constant input 1:
  `Δy_t = Σ_j u_tj (θ_j · x̃_t)`, x̃ = [Vᵀx, 1]: linear in θ [R, q(+1)].
- `θ = argmin Σ_t ||r_t − Δy_t||² + λ||θ||²`, r the original layer's experts output minus the compressed
  one: a ridge regression with normal equations
  `G[(j,a),(j',b)] = Σ_t (u_tj·u_tj') x̃_ta x̃_tb`, `C[(j,a)] = Σ_t (u_tj·r_t) x̃_ta`, streamed over the
  batches in float64 (the renormalised rule has K nonzero u_tj per token, the softmax rule R).

A linear step can overshoot, and a new router also changes which experts are selected, which the
linearisation does not see. So every ridge strength is scored on the held-out calibration tokens by
running the block with the new router for real (`moeprune.pipeline.compensate`), the best is kept, and
the refit is not applied when none lowers the real held-out error. With `router+down` the down
projections are then fitted (`moeprune.methods.compensation`) on the routing the new router gives.

The directions V come from the first fitted batch's router inputs (the top eigenvectors of their
second moment). The normal matrix holds (R·(q+1))² float64 numbers, at most about `max_features`² (8 MiB
at the default 1024), whatever the model's size. Routers with other gates (sigmoid scores, group
limits, scaled gates) are refused before calibration.

Shape letters: T tokens, K experts per token, R kept experts, H the router's input width, q the
directions kept of it (+1 with a bias), D the experts' output width.
"""

from __future__ import annotations

import torch

GATE_TOLERANCE = 1e-3  # relative: the recorded gates must be softmax(l[S]) of the router's own logits


RULES = ("renormalised", "softmax")


def router_features(rule: str, gates: torch.Tensor, selected: torch.Tensor, outputs: torch.Tensor,
                    probabilities: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [T, J], u [T, J, D]): the kept rows whose logit moves each token's output, and how much per
    unit of logit (module docstring).

    gates [T, K] and selected [T, K] are the recorded routing, outputs [T, K, D] the raw outputs of the
    selected experts; `softmax` also needs probabilities [T, R], the softmax over every kept expert."""
    mixed = (gates[..., None] * outputs).sum(1, keepdim=True)  # [T, 1, D] y_t
    if rule == "renormalised":
        return selected, gates[..., None] * (outputs - mixed)
    T, R = probabilities.shape
    hit = torch.zeros(T, R, outputs.shape[-1], dtype=outputs.dtype)  # [T, R, D] E_j where j ∈ S_t, else 0
    hit.scatter_(1, selected[..., None].expand_as(outputs), outputs)
    rows = torch.arange(R).expand(T, R)
    return rows, probabilities[..., None] * (hit - mixed)


def kept_directions(num_kept: int, width: int, max_features: int) -> int:
    """q: every input direction while R·H ≤ max_features, else the top max_features // R of them."""
    return width if num_kept * width <= max_features else max(1, max_features // num_kept)


def principal_directions(x: torch.Tensor, q: int) -> torch.Tensor:
    """[H, q] the top-q eigenvectors of the second moment of x [T, H] (the identity when q = H)."""
    H = x.shape[1]
    if q >= H:
        return torch.eye(H, dtype=torch.float64)
    moment = x.double().T @ x.double()  # [H, H]
    _, vecs = torch.linalg.eigh(moment)  # ascending
    return vecs[:, -q:].flip(1).contiguous()


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
        """One batch: projected router inputs x̃ [T, q(+1)], the rows each token moves [T, J], their
        features u [T, J, D] (`router_features`), target r [T, D]."""
        T, K = selected.shape  # K: the rows each token moves (the selected ones, or every kept row)
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
