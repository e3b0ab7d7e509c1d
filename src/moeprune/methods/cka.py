"""Linear CKA (centred kernel alignment), the similarity DEK groups experts by.

For representations X [n, d1] and Y [n, d2] of the same n samples, with columns centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)
              = <K, L>_F / (||K||_F * ||L||_F),   K = X X^T, L = Y Y^T   [n, n]

The first line is the *feature form* (cost ~ n d^2), the second the *Gram form* (cost ~ n^2 d);
both are exact. For one pair, `form="auto"` takes the Gram form when n < d, as docs/methods.md ("DEK") says;
for the [E, E] matrix of a layer it takes the cheaper in total, since each expert's Gram matrix
serves all its pairs (`pairwise_form`). CKA lies in
[0, 1], is symmetric, is 1 for identical representations and for isotropic scalings of them, and
is invariant to orthogonal transforms of the features.

A representation that is constant over the samples (zero after centring, e.g. a dead expert)
leaves CKA undefined (0/0). Here it is *defined*: two constant representations have CKA 1 (they
are indistinguishable), a constant and a non-constant one have CKA 0. A warning says so, once per
call; the result is never NaN. The unbiased (minibatch) HSIC estimator, an open alternative in
docs/methods.md, is not implemented.

All arithmetic is float64. Shape letters: E experts, n samples, d features.
"""

from __future__ import annotations

import warnings

import torch

FORMS = ("auto", "gram", "feature")
DEGENERATE_RTOL = 1e-10  # centred norm below this fraction of the raw norm counts as constant


class DegenerateRepresentationWarning(UserWarning):
    """A representation is constant over its samples, so CKA is replaced by its defined value."""


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form {form!r} is not one of {FORMS}")


def center(X: torch.Tensor) -> torch.Tensor:
    """Subtract the column means (over the sample axis, -2), in float64."""
    X = X.double()
    return X - X.mean(dim=-2, keepdim=True)


def is_degenerate(X: torch.Tensor, Xc: torch.Tensor) -> torch.Tensor:
    """[...] True where a representation is constant over its samples (zero after centring)."""
    raw = X.double().flatten(-2).norm(dim=-1)
    cen = Xc.flatten(-2).norm(dim=-1)
    return cen <= DEGENERATE_RTOL * raw


def _warn(count: int, what: str) -> None:
    warnings.warn(
        f"linear CKA: {count} {what} constant over the samples (zero after centring); CKA is set to "
        "1 between two constant representations and 0 between a constant and a varying one",
        DegenerateRepresentationWarning,
        stacklevel=3,
    )


def linear_cka(X: torch.Tensor, Y: torch.Tensor, *, centered: bool = False, form: str = "auto") -> float:
    """CKA of X [n, d1] and Y [n, d2] (same n samples), a float in [0, 1], never NaN.

    `centered=True` skips the column centring (the caller already centred, or wants the raw
    second-moment comparison). `form` picks the Gram ("gram") or feature ("feature") computation;
    "auto" takes the Gram form when n < max(d1, d2).
    """
    _check_form(form)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"linear_cka needs [n, d] matrices with the same n, got {tuple(X.shape)}, {tuple(Y.shape)}"
        )
    Xc = X.double() if centered else center(X)
    Yc = Y.double() if centered else center(Y)
    dx, dy = bool(is_degenerate(X, Xc)), bool(is_degenerate(Y, Yc))
    if dx or dy:
        _warn(int(dx) + int(dy), "representation(s)")
        return 1.0 if dx and dy else 0.0
    n = X.shape[0]
    if form == "gram" or (form == "auto" and n < max(X.shape[1], Y.shape[1])):
        K, L = Xc @ Xc.T, Yc @ Yc.T  # [n, n]
        num, nx, ny = (K * L).sum(), K.norm(), L.norm()
    else:
        num = (Yc.T @ Xc).square().sum()
        nx, ny = (Xc.T @ Xc).norm(), (Yc.T @ Yc).norm()
    return float((num / (nx * ny)).clamp(0.0, 1.0))


def pairwise_form(E: int, n: int, d: int) -> str:
    """The cheaper exact form for an [E, E] CKA matrix of [n, d] representations.

    Gram: one n x n Gram matrix per expert, reused by every pair (~ E n^2 d + E^2 n^2 / 2).
    Feature: one d x d cross matrix per pair (~ E^2 n d^2 / 2).
    """
    return "gram" if E * n * n * d + E * E * n * n / 2 <= E * E * n * d * d / 2 else "feature"


def pairwise_cka(reps: torch.Tensor, *, centered: bool = False, form: str = "auto",
                 max_bytes: int = 1 << 30) -> torch.Tensor:
    """[E, E] float64 CKA between every pair of E representations reps [E, n, d].

    The diagonal is 1. Constant representations get the defined values of `linear_cka` and one
    warning for the whole call. `form="auto"` takes the cheaper of the two exact forms
    (`pairwise_form`). The Gram form keeps at most `max_bytes` of Gram matrices at once (blocks of
    experts otherwise, recomputing Grams per block pair).
    """
    _check_form(form)
    if reps.ndim != 3:
        raise ValueError(f"pairwise_cka needs [E, n, d] representations, got {tuple(reps.shape)}")
    E, n, d = reps.shape
    Xc = reps.double() if centered else center(reps)  # [E, n, d]
    degenerate = is_degenerate(reps, Xc)  # [E]
    form = pairwise_form(E, n, d) if form == "auto" else form
    inner = torch.zeros(E, E, dtype=torch.float64)  # <K_i, K_j> = ||X_j^T X_i||_F^2
    if form == "gram":
        block = max(1, min(E, max_bytes // (8 * n * n)))

        def grams(a: int) -> torch.Tensor:  # [b, n*n] flattened Gram matrices of experts a .. a+block
            X = Xc[a:a + block]
            return (X @ X.transpose(1, 2)).reshape(X.shape[0], n * n)

        for a in range(0, E, block):
            Ga = grams(a)
            for b in range(a, E, block):
                Gb = Ga if b == a else grams(b)
                prod = Ga @ Gb.T  # [block, block]
                inner[a:a + block, b:b + block] = prod
                inner[b:b + block, a:a + block] = prod.T
    else:
        for i in range(E):  # ||X_j^T X_i||_F^2 for j >= i, one expert row at a time
            cross = torch.einsum("nd,jne->jde", Xc[i], Xc[i:])  # [E - i, d, d]
            row = cross.square().sum(dim=(1, 2))  # [E - i]
            inner[i, i:] = row
            inner[i:, i] = row
    inner = (inner + inner.T) / 2  # exact symmetry despite rounding
    norms = inner.diagonal().clamp(min=0).sqrt()  # [E] ||K_i||_F
    denom = norms[:, None] * norms[None, :]
    sim = torch.where(
        denom > 0, inner / denom.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(inner)
    )
    sim = sim.clamp(0.0, 1.0)
    if degenerate.any():
        _warn(int(degenerate.sum()), "of the representations are")
        both = degenerate[:, None] & degenerate[None, :]
        one = degenerate[:, None] ^ degenerate[None, :]
        sim = torch.where(both, torch.ones_like(sim), torch.where(one, torch.zeros_like(sim), sim))
    sim.fill_diagonal_(1.0)
    return sim


def pairwise_vector_cka(V: torch.Tensor, *, chunk: int = 1 << 20) -> torch.Tensor:
    """[E, E] CKA between E single-feature representations V [E, D] (D samples, one feature each).

    That is the squared Pearson correlation of the rows. Computed in float64 chunks along D, so a
    flattened expert (millions of weights) never needs a full float64 copy.
    """
    E, D = V.shape
    s = torch.zeros(E, dtype=torch.float64)
    P = torch.zeros(E, E, dtype=torch.float64)  # raw inner products
    raw = torch.zeros(E, dtype=torch.float64)
    for start in range(0, D, chunk):
        c = V[:, start:start + chunk].double()  # [E, c]
        s += c.sum(dim=1)
        P += c @ c.T
        raw += c.square().sum(dim=1)
    mean = s / D
    C = P - D * mean[:, None] * mean[None, :]  # centred inner products
    var = C.diagonal().clamp(min=0)
    degenerate = var.sqrt() <= DEGENERATE_RTOL * raw.sqrt()
    denom = var[:, None] * var[None, :]
    sim = torch.where(
        denom > 0, C.square() / denom.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(C)
    )
    sim = sim.clamp(0.0, 1.0)
    if degenerate.any():
        _warn(int(degenerate.sum()), "of the representations are")
        both = degenerate[:, None] & degenerate[None, :]
        sim = torch.where(both, torch.ones_like(sim), torch.where(degenerate[:, None] | degenerate[None, :],
                                                                 torch.zeros_like(sim), sim))
    sim.fill_diagonal_(1.0)
    return sim
