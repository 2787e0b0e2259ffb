"""Part of a symmetric spectrum — the top by Lanczos, or either end from one tridiagonalisation — and the
γ-energy rule on it.

The γ-approximate null space (paper, eq. 3) removes the r top eigenvectors, r = min{r : Σ_{i≤r} λ_i ≥
γ Σ_i λ_i}, eigenvalues clamped at 0 (the clamp matters for the Hessian only). The rule needs the *total*
Σ_i max(λ_i, 0), not every eigenvalue: given the exact total, the top m eigenvalues decide r whenever
r < m. What γ = 1 − 10^(−k) asks of an eigensolver therefore depends on k. For the 84-unit head's GGN at
θ0 (5,664 live coordinates) r is 30, 155, 443, 969, 2,242 and 3,878 for k = 1, 2, 3, 4, 5.5, 7: a few
top eigenpairs at small k, most of the spectrum at large k. Hence three solvers:

- `lanczos_top`: the m largest eigenpairs of a matrix-free product (ARPACK `eigsh`). With the GGN's exact
  trace as the total it is a true partial solver (`lanczos_for_gamma` grows m until r is decided). Its cost
  grows ~m², so it is used only for small r.
- `tridiagonal_partial`: one Householder tridiagonalisation of the dense block (LAPACK dsytrd), *all*
  eigenvalues from the tridiagonal matrix (dstemr, O(n²)), then eigenvectors only for the end that is
  needed — the r top ones, or the n − r kept ones when those are fewer (dstemr + torch.ormqr for the
  back-transformation). About half the cost of a full `eigh` on this machine, whatever r is, and the only
  exact way to get the Hessian's total: its negative eigenvalues (up to 10 per live hidden unit, ~19 % of
  Σ|λ| for the 84-unit head at θ0) enter Σ max(λ, 0) = tr H + Σ|λ_neg|.
- `dense_top`: a full `torch.linalg.eigh` — the oracle in the tests.

`Spectrum.n_removed(γ)` returns None when the known eigenvalues do not decide r (the caller computes
more), never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

LANCZOS_TOL = 1e-11  # ARPACK's relative tolerance on the Ritz values


@dataclass
class Spectrum:
    """lam: known eigenvalues, descending, clamped at 0 (float64) — all n of them (values_complete) or the
    top m; total: Σ max(λ, 0) over all n; U (n, c): eigenvectors of lam[first : first + c]."""

    lam: torch.Tensor
    U: torch.Tensor
    total: float
    values_complete: bool
    first: int
    solver: str
    n_negative: int | None = None  # negative eigenvalues (clamped in lam), when all values are known
    negative_mass: float | None = None  # Σ |λ_neg|

    @property
    def n(self) -> int:
        return int(self.U.shape[0])

    def n_removed(self, gamma: float) -> int | None:
        """The number of top eigenvectors the γ-energy rule removes (values tied with the cutoff are
        removed too, as in `energy_cutoff_values`), or None when the known values do not decide it."""
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if gamma == 0.0 or self.total <= 0.0:
            return 0
        lam = self.lam.clamp_min(0.0)
        cum = torch.cumsum(lam, 0)
        k = int(torch.searchsorted(cum, torch.tensor(gamma * self.total, dtype=cum.dtype)).item())
        if k >= lam.numel():  # the known eigenvalues hold less than γ of the total
            return lam.numel() if self.values_complete else None
        r = int((lam >= lam[k]).sum())
        if r == lam.numel() and not self.values_complete:  # ties with the cutoff may continue past m
            return None
        return r

    def vectors(self, gamma: float) -> tuple[torch.Tensor, bool, int]:
        """(V, removed, r): the eigenvectors of the r removed directions (removed=True) or of the n − r kept
        ones (removed=False), whichever is narrower among those available; ValueError if neither is."""
        r = self.n_removed(gamma)
        if r is None:
            raise ValueError(f"the {self.solver} spectrum ({self.lam.numel()} of {self.n} eigenvalues) does not "
                             f"decide γ = {gamma}")
        c = self.U.shape[1]
        has_removed = self.first == 0 and c >= r
        has_kept = self.first <= r and self.first + c == self.n
        if has_kept and (not has_removed or self.n - r < r):
            return self.U[:, r - self.first:], False, r
        if has_removed:
            return self.U[:, :r], True, r
        raise ValueError(f"the {self.solver} spectrum holds eigenvectors {self.first}..{self.first + c - 1}, "
                         f"neither the {r} removed nor the {self.n - r} kept ones for γ = {gamma}")


def removed_count(lam: torch.Tensor, total: float, gamma: float) -> int:
    """r for a complete descending spectrum."""
    r = Spectrum(lam, torch.empty(lam.numel(), 0, dtype=torch.float64), total, True, 0, "values").n_removed(gamma)
    assert r is not None
    return r


def dense_top(M: torch.Tensor) -> Spectrum:
    """All eigenpairs of the symmetric matrix M (float64 eigh), descending."""
    M = M.double()
    lam, U = torch.linalg.eigh(0.5 * (M + M.T))
    neg = lam[lam < 0]
    lam, U = lam.flip(0).clamp_min(0.0), U.flip(1)
    return Spectrum(lam, U, float(lam.sum()), True, 0, "dense eigh", int(neg.numel()), float(-neg.sum()))


class Tridiagonal:
    """M = Q T Qᵀ from LAPACK dsytrd (lower), T tridiagonal; eigenvalues and selected eigenvectors of T by
    MRRR (dstemr), mapped back with Q's Householder reflectors (torch.ormqr, as LAPACK's dormtr does)."""

    def __init__(self, M: torch.Tensor):
        from scipy.linalg import lapack

        self._lapack = lapack
        a = np.array(M.double().numpy(), order="F", copy=True)  # dsytrd overwrites it
        self.n = a.shape[0]
        lwork = int(lapack.dsytrd_lwork(self.n, lower=1)[0])
        c, self.d, self.e, self.tau, info = lapack.dsytrd(a, lower=1, lwork=max(lwork, 1), overwrite_a=1)
        if info != 0:
            raise FloatingPointError(f"dsytrd failed (info={info})")
        self.reflectors = torch.from_numpy(c)  # column-major view; only the part below the subdiagonal is used

    def _stemr(self, rng: int, il: int, iu: int, vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        e = np.concatenate([self.e, [0.0]])  # dstemr overwrites d and e: always pass copies
        m, w, z, info = self._lapack.dstemr(self.d.copy(), e, rng, 0.0, 0.0, il, iu, compute_v=int(vectors))
        if info != 0:
            raise FloatingPointError(f"dstemr failed (info={info})")
        return w[:m], (z[:, :m] if vectors else None)

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues, ascending."""
        return torch.from_numpy(self._stemr(0, 1, self.n, False)[0].copy())

    def eigenvectors(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs lo..hi−1 in ascending order (0-based, hi exclusive): (values, vectors (n, hi − lo))."""
        if not 0 <= lo < hi <= self.n:
            raise ValueError(f"bad eigenvector range {lo}..{hi} for n={self.n}")
        w, z = self._stemr(2, lo + 1, hi, True)
        Z = torch.from_numpy(np.ascontiguousarray(z))
        if self.n > 1:
            Z[1:] = torch.ormqr(self.reflectors[1:, :-1], torch.from_numpy(self.tau), Z[1:], left=True,
                                transpose=False)
        return torch.from_numpy(w.copy()), Z


def _orthonormal(V: torch.Tensor, probes: int = 4, tol: float = 1e-8) -> bool:
    """‖V w‖ = ‖w‖ for random w: a cheap check that MRRR's eigenvectors are orthonormal (O(n·c) per probe)."""
    if V.shape[1] == 0:
        return True
    W = torch.randn(V.shape[1], probes, dtype=V.dtype, generator=torch.Generator().manual_seed(0))
    return bool(((V @ W).norm(dim=0) / W.norm(dim=0) - 1.0).abs().max() <= tol)


def tridiagonal_partial(M: torch.Tensor, gammas: tuple[float, ...]) -> Spectrum:
    """All eigenvalues of M and the eigenvectors that the γs need: the top r(max γ) ones, or — for a
    single γ — the n − r kept ones when those are fewer. MRRR can fail on a tight cluster (the kept end
    holds the exactly degenerate zero-curvature directions, e.g. the softmax's logit shifts), so a failed
    or non-orthonormal end falls back to the other end, then to a full eigh."""
    tri = Tridiagonal(M)
    n = tri.n
    lam_all = tri.eigenvalues().flip(0)
    total = float(lam_all.clamp_min(0.0).sum())
    lam = lam_all.clamp_min(0.0)
    neg = lam_all[lam_all < 0]
    r = max(removed_count(lam, total, g) for g in gammas)
    if len(gammas) > 1:  # only the top end serves several γ
        ends = ["removed"]
    else:  # the narrower end first
        ends = ["kept", "removed"] if n - r < r else ["removed", "kept"]
    for end in ends:
        lo, hi, first = (n - r, n, 0) if end == "removed" else (0, n - r, r)
        try:
            V = tri.eigenvectors(lo, hi)[1] if hi > lo else torch.empty(n, 0, dtype=torch.float64)
        except FloatingPointError:
            continue
        if _orthonormal(V):
            return Spectrum(lam, V.flip(1), total, True, first, "tridiagonal", int(neg.numel()), float(-neg.sum()))
    spec = dense_top(M)
    spec.solver = "dense eigh (MRRR failed)"
    return spec


def lanczos_top(matmat: Callable[[torch.Tensor], torch.Tensor], n: int, m: int, total: float,
                seed: int = 0, tol: float = LANCZOS_TOL) -> Spectrum:
    """The m algebraically largest eigenpairs of the symmetric operator v ↦ matmat(v) (float64, size n) by
    implicitly restarted Lanczos (ARPACK via scipy.sparse.linalg.eigsh), from a fixed start vector so that
    runs are reproducible. `total` is the exact Σ max(λ, 0) of the whole operator."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    m = int(min(m, n - 1))
    if m < 1:
        raise ValueError(f"need 1 ≤ m < n for Lanczos, got m={m}, n={n}")

    def mv(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
        return matmat(t.reshape(n, -1)).numpy().reshape(v.shape)

    op = LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    lam, U = eigsh(op, k=m, which="LA", tol=tol, v0=v0, ncv=min(n, max(2 * m + 1, m + 64)))
    order = np.argsort(lam)[::-1]
    lam_t = torch.from_numpy(lam[order].copy()).clamp_min(0.0)
    return Spectrum(lam_t, torch.from_numpy(U[:, order].copy()), float(total), False, 0, "lanczos")


def lanczos_for_gamma(matmat: Callable[[torch.Tensor], torch.Tensor], n: int, total: float, gamma: float,
                      m0: int, max_m: int, seed: int = 0) -> Spectrum | None:
    """Lanczos with m0 eigenpairs, grown ×1.6 until they decide r(γ) with at least 8 spare values below the
    cutoff (so that the r-th Ritz pair has converged neighbours); None once m would exceed max_m (then the
    tridiagonal route is cheaper)."""
    m = max(int(m0), 8)
    while m <= max_m:
        top = lanczos_top(matmat, n, m, total, seed)
        r = top.n_removed(gamma)
        if r is not None and r + 8 <= top.lam.numel():
            return top
        m = int(math.ceil(1.6 * m)) + 8
    return None
