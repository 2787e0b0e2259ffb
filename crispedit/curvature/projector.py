"""Matrix-free projectors onto the kept (low-curvature) subspace of a K-FAC block (paper, App. D, Prop. 3).

    P(Q) = U_S ((U_Sᵀ Q U_A) ⊙ M) U_Aᵀ,        Q, M ∈ R^{d_out × d_in}

never forms the (d_out·d_in)² projector. Because eigenvalues are sorted in descending order, the removed
products (M = 0) sit in a top-left "staircase" of the rotated coordinates, inside a box of r rows and c
columns. When that box is small the identity P(Q) = Q − U_S[:, :r]((U_S[:, :r]ᵀ Q U_A[:, :c]) ⊙ (1−M)[:r,:c])U_A[:, :c]ᵀ
costs O(d_out·d_in·c) instead of O(d_out·d_in·(d_out+d_in)); the projector picks the cheaper form.
Both are the same orthogonal projector (tested against the explicit matrix).
"""

from __future__ import annotations

import torch


class KroneckerProjector:
    """Orthogonal projector Q ↦ U_S((U_Sᵀ Q U_A) ⊙ M)U_Aᵀ for one (d_out, d_in) weight."""

    def __init__(self, U_S: torch.Tensor, U_A: torch.Tensor, keep: torch.Tensor,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 form: str = "auto"):
        device = device if device is not None else U_S.device
        self.U_S = U_S.to(device=device, dtype=dtype).contiguous()
        self.U_A = U_A.to(device=device, dtype=dtype).contiguous()
        self.keep = keep.to(device=device)
        self.M = self.keep.to(dtype)
        removed = ~self.keep
        rows = torch.nonzero(removed.any(dim=1))
        cols = torch.nonzero(removed.any(dim=0))
        self.r = int(rows.max()) + 1 if rows.numel() else 0
        self.c = int(cols.max()) + 1 if cols.numel() else 0
        d_out, d_in = self.keep.shape
        dense_cost = d_out * d_in * (d_out + d_in)
        block_cost = d_out * d_in * self.c + d_out * self.r * self.c
        if form == "auto":
            form = "block" if block_cost < dense_cost else "dense"
        if form not in ("dense", "block"):
            raise ValueError(f"unknown projector form {form!r}")
        self.form = form
        self.R = removed[: self.r, : self.c].to(dtype)
        self.U_Sr = self.U_S[:, : self.r].contiguous()
        self.U_Ac = self.U_A[:, : self.c].contiguous()

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

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        dtype = Q.dtype
        Q = Q.to(self.U_S.dtype)
        if self.form == "dense":
            out = self.unrotate(self.rotate(Q) * self.M)
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
        keep_cols = keep_cols.to(device=U_A.device)
        self.keep_cols = keep_cols
        U_A = U_A.to(device=device, dtype=dtype)
        self.U_A = U_A.contiguous()
        self.M = keep_cols.to(device=device, dtype=dtype)[None, :]
        self.U_keep = U_A[:, keep_cols.to(device)].contiguous()
        self.U_drop = U_A[:, ~keep_cols.to(device)].contiguous()

    @property
    def kept_fraction(self) -> float:
        return float(self.keep_cols.double().mean())

    def rotate(self, Q: torch.Tensor) -> torch.Tensor:
        """Coordinates in the eigenbasis of A (columns); the mask `M` broadcasts over rows."""
        return Q.to(self.U_A.dtype) @ self.U_A

    def unrotate(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.U_A.T

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        dtype = Q.dtype
        Q = Q.to(self.U_keep.dtype)
        if self.U_drop.shape[1] <= self.U_keep.shape[1]:
            out = Q - (Q @ self.U_drop) @ self.U_drop.T
        else:
            out = (Q @ self.U_keep) @ self.U_keep.T
        return out.to(dtype)


def explicit_projector(U_S: torch.Tensor, U_A: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (d_out·d_in)² projector matrix in row-major vec(W) (tests and tiny problems only)."""
    cols = [torch.kron(U_S[:, i], U_A[:, j]) for i, j in torch.nonzero(keep).tolist()]
    n = U_S.shape[0] * U_A.shape[0]
    if not cols:
        return torch.zeros(n, n, dtype=U_S.dtype)
    V = torch.stack(cols, dim=1)
    return V @ V.T
