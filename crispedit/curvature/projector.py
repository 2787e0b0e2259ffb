"""Matrix-free projectors onto the kept (low-curvature) subspace of a K-FAC block (paper, App. D, Prop. 3).

    P(Q) = U_S ((U_Sᵀ Q U_A) ⊙ M) U_Aᵀ,        Q, M ∈ R^{d_out × d_in}

never forms the (d_out·d_in)² projector. Eigenvalues are sorted in descending order, so the kept products
(M = 1) form a bottom-right "staircase" of the rotated coordinates and the removed ones a top-left one.
Two ways to save work follow from that shape:

- `block`: when the removed products fit in a small box of r rows and c columns,
  P(Q) = Q − U_S[:, :r]((U_S[:, :r]ᵀ Q U_A[:, :c]) ⊙ (1−M)[:r,:c])U_A[:, :c]ᵀ costs O(d_out·d_in·c).
- `staircase`: otherwise the rows of the rotated coordinates are cut into groups; a group only needs the
  columns where it keeps something, so the large-side rotation costs d_in × (kept entries + slack) instead
  of d_in × d_out·d_in. The grouping is chosen by a small dynamic programme. `rotate_masked`/`unrotate_masked`
  use it too: they are what Adam-in-the-eigenbasis needs every step.

All forms are the same orthogonal projector (tested against the explicit matrix).
"""

from __future__ import annotations

import torch

ROW_QUANTUM = 8  # group boundaries fall on multiples of this many rows
GROUP_OVERHEAD = 16  # per-group cost, in rows' worth of a full-width product, charged by the grouping


def _row_groups(keep: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Contiguous row groups (a, b, lo, hi) covering every row that keeps something; group rows a:b only need
    columns lo:hi. Minimises Σ (rows + overhead)·width over boundaries on multiples of ROW_QUANTUM (O(n²) in
    the number of candidate boundaries, pure Python on per-slice minima)."""
    d_out, d_in = keep.shape
    any_row = keep.any(dim=1)
    if not bool(any_row.any()):
        return []
    nz = torch.nonzero(any_row).flatten()
    r0, r1 = int(nz.min()), int(nz.max()) + 1
    cols = torch.arange(d_in)
    first = torch.where(keep, cols, d_in).min(dim=1).values  # d_in where a row keeps nothing
    last = torch.where(keep, cols, -1).max(dim=1).values
    cuts = sorted({r0, r1, *range((r0 // ROW_QUANTUM + 1) * ROW_QUANTUM, r1, ROW_QUANTUM)})
    n = len(cuts)
    slice_lo = [int(first[cuts[k] : cuts[k + 1]].min()) for k in range(n - 1)]
    slice_hi = [int(last[cuts[k] : cuts[k + 1]].max()) + 1 for k in range(n - 1)]
    best = [0.0] + [float("inf")] * (n - 1)
    choice = [0] * n
    for j in range(1, n):
        lo, hi = d_in, 0
        for i in range(j - 1, -1, -1):  # group = slices i..j-1
            lo, hi = min(lo, slice_lo[i]), max(hi, slice_hi[i])
            width = max(hi - lo, 0)
            cost = best[i] + ((cuts[j] - cuts[i]) + GROUP_OVERHEAD) * width
            if cost < best[j]:
                best[j], choice[j] = cost, i
    groups = []
    j = n - 1
    while j > 0:
        i = choice[j]
        lo, hi = min(slice_lo[i:j]), max(slice_hi[i:j])
        if hi > lo:
            groups.append((cuts[i], cuts[j], lo, hi))
        j = i
    return groups[::-1]


class KroneckerProjector:
    """Orthogonal projector Q ↦ U_S((U_Sᵀ Q U_A) ⊙ M)U_Aᵀ for one (d_out, d_in) weight."""

    def __init__(self, U_S: torch.Tensor, U_A: torch.Tensor, keep: torch.Tensor,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 form: str = "auto"):
        device = device if device is not None else U_S.device
        self.U_S = U_S.to(device=device, dtype=dtype).contiguous()
        self.U_A = U_A.to(device=device, dtype=dtype).contiguous()
        keep = keep.to(device="cpu", dtype=torch.bool)
        self.keep = keep.to(device)
        self.M = self.keep.to(dtype)
        removed = ~keep
        rows = torch.nonzero(removed.any(dim=1))
        cols = torch.nonzero(removed.any(dim=0))
        self.r = int(rows.max()) + 1 if rows.numel() else 0
        self.c = int(cols.max()) + 1 if cols.numel() else 0
        d_out, d_in = keep.shape
        self.groups = _row_groups(keep)
        g_rows = (self.groups[-1][1] - self.groups[0][0]) if self.groups else 0
        costs = {
            "dense": d_out * d_in * (d_out + d_in),
            "block": d_out * d_in * self.c + d_out * self.r * self.c,
            "staircase": d_out * d_in * g_rows + d_in * sum((b - a) * (hi - lo) for a, b, lo, hi in self.groups),
        }
        if form == "auto":
            form = min(costs, key=costs.get)  # type: ignore[arg-type]
        if form not in costs:
            raise ValueError(f"unknown projector form {form!r}; expected one of {tuple(costs)}")
        self.form = form
        # Grouped masked rotations pay for their extra copies only when they skip a good share of the work.
        self.grouped = costs["staircase"] < 0.85 * costs["dense"]
        self.R = removed[: self.r, : self.c].to(device=device, dtype=dtype)
        self.U_Sr = self.U_S[:, : self.r].contiguous()
        self.U_Ac = self.U_A[:, : self.c].contiguous()
        self.row_span = (self.groups[0][0], self.groups[-1][1]) if self.groups else (0, 0)
        self.U_Sg = self.U_S[:, self.row_span[0] : self.row_span[1]].contiguous()
        self.M_groups = [self.M[a:b, lo:hi].contiguous() for a, b, lo, hi in self.groups]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.keep.shape)  # type: ignore[return-value]

    @property
    def kept_fraction(self) -> float:
        return float(self.M.mean())

    def rotate(self, Q: torch.Tensor) -> torch.Tensor:
        """Coordinates of Q in the Kronecker eigenbasis: U_Sᵀ Q U_A."""
        return self.U_S.T @ Q.to(self.U_S.dtype) @ self.U_A

    def unrotate(self, X: torch.Tensor) -> torch.Tensor:
        return self.U_S @ X @ self.U_A.T

    def rotate_masked(self, Q: torch.Tensor) -> torch.Tensor:
        """(U_Sᵀ Q U_A) ⊙ M, computing only the row groups' kept column ranges."""
        Q = Q.to(self.U_S.dtype)
        if not self.grouped:
            return self.rotate(Q) * self.M
        X = Q.new_zeros(self.shape)
        if not self.groups:
            return X
        r0 = self.row_span[0]
        Y = self.U_Sg.T @ Q
        for (a, b, lo, hi), Mg in zip(self.groups, self.M_groups):
            X[a:b, lo:hi] = (Y[a - r0 : b - r0] @ self.U_A[:, lo:hi]) * Mg
        return X

    def unrotate_masked(self, X: torch.Tensor) -> torch.Tensor:
        """U_S (X ⊙ M) U_Aᵀ, reading only the row groups' kept column ranges of X."""
        if not self.grouped:
            return self.unrotate(X * self.M)
        out_rows = self.row_span[1] - self.row_span[0]
        Z = X.new_zeros(out_rows, self.shape[1])
        if not self.groups:
            return X.new_zeros(self.shape)
        r0 = self.row_span[0]
        for (a, b, lo, hi), Mg in zip(self.groups, self.M_groups):
            Z[a - r0 : b - r0] = (X[a:b, lo:hi] * Mg) @ self.U_A[:, lo:hi].T
        return self.U_Sg @ Z

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        dtype = Q.dtype
        Q = Q.to(self.U_S.dtype)
        if self.form == "dense":
            out = self.unrotate(self.rotate(Q) * self.M)
        elif self.form == "staircase":
            out = self.unrotate_masked(self.rotate_masked(Q))
        elif self.r == 0:
            out = Q.clone()
        else:
            inner = (self.U_Sr.T @ (Q @ self.U_Ac)) * self.R
            out = Q - self.U_Sr @ inner @ self.U_Ac.T
        return out.to(dtype)

    def removed_part(self, Q: torch.Tensor) -> torch.Tensor:
        """Q − P(Q): the component in the high-curvature (forbidden) directions."""
        return Q - self(Q)


class InputNullspaceProjector:
    """Adam-NSCL / AlphaEdit-style projector: keep the input directions where the activation covariance A
    is small (Q ↦ Q U_k U_kᵀ), regardless of the output-gradient factor."""

    def __init__(self, U_A: torch.Tensor, keep_cols: torch.Tensor, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        device = device if device is not None else U_A.device
        keep_cols = keep_cols.to(device=device, dtype=torch.bool)
        self.keep_cols = keep_cols
        U_A = U_A.to(device=device, dtype=dtype)
        self.U_A = U_A.contiguous()
        self.M = keep_cols.to(device=device, dtype=dtype)[None, :]
        self.U_keep = U_A[:, keep_cols].contiguous()
        self.U_drop = U_A[:, ~keep_cols].contiguous()

    @property
    def kept_fraction(self) -> float:
        return float(self.keep_cols.double().mean())

    def rotate(self, Q: torch.Tensor) -> torch.Tensor:
        """Coordinates in the eigenbasis of A (columns); the mask `M` broadcasts over rows."""
        return Q.to(self.U_A.dtype) @ self.U_A

    def unrotate(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.U_A.T

    def rotate_masked(self, Q: torch.Tensor) -> torch.Tensor:
        """(Q U_A) ⊙ M, computing the kept columns only."""
        Q = Q.to(self.U_A.dtype)
        X = Q.new_zeros(Q.shape[0], self.U_A.shape[1])
        X[:, self.keep_cols] = Q @ self.U_keep
        return X

    def unrotate_masked(self, X: torch.Tensor) -> torch.Tensor:
        """(X ⊙ M) U_Aᵀ, reading the kept columns only."""
        return X[:, self.keep_cols] @ self.U_keep.T

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        dtype = Q.dtype
        Q = Q.to(self.U_keep.dtype)
        if self.U_drop.shape[1] <= self.U_keep.shape[1]:
            out = Q - (Q @ self.U_drop) @ self.U_drop.T
        else:
            out = (Q @ self.U_keep) @ self.U_keep.T
        return out.to(dtype)


def kept_overlap(p: KroneckerProjector, q: KroneckerProjector) -> float:
    """The share of p's kept subspace that q keeps too: trace(P Q) / trace(P), 1 when q keeps all of it.

    With P = Σ_{(i,j) kept by p} (s_i ⊗ a_j)(s_i ⊗ a_j)ᵀ and likewise for Q, trace(P Q) = Σ_{ij∈p, kl∈q}
    (s_iᵀ s'_k)² (a_jᵀ a'_l)², i.e. Σ M_p ⊙ (C_S M_q C_Aᵀ) with C = (U_pᵀ U_q)² elementwise: two curvature
    estimates (e.g. from different amounts of text) agree on what is free to edit exactly when this is near 1."""
    if p.shape != q.shape:
        raise ValueError(f"projectors of different shapes: {p.shape} and {q.shape}")
    C_S = (p.U_S.double().T @ q.U_S.double()) ** 2
    C_A = (p.U_A.double().T @ q.U_A.double()) ** 2
    kept = p.M.double().sum()
    if kept == 0:
        return 1.0
    return float((p.M.double() * (C_S @ q.M.double() @ C_A.T)).sum() / kept)


def explicit_projector(U_S: torch.Tensor, U_A: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (d_out·d_in)² projector matrix in row-major vec(W) (tests and tiny problems only)."""
    cols = [torch.kron(U_S[:, i], U_A[:, j]) for i, j in torch.nonzero(keep).tolist()]
    n = U_S.shape[0] * U_A.shape[0]
    if not cols:
        return torch.zeros(n, n, dtype=U_S.dtype)
    V = torch.stack(cols, dim=1)
    return V @ V.T
