"""Eigenbases of the K-FAC factors (float64 eigh, computed once and cached).

With sink positions kept apart (CurvatureConfig.sink_tokens > 0) the input basis is built as
[V, U_rest]: V spans the directions holding `sink_energy` of the sink activations' second moment and gets
eigenvalue +inf (so every product in those columns is always removed), and U_rest diagonalises A
compressed onto the orthogonal complement of V. The result is still an orthonormal Kronecker eigenbasis,
so the masked projector remains an exact orthogonal projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crispedit.curvature.energy import energy_rank
from crispedit.curvature.stats import LayerStats


@dataclass
class LayerEigen:
    """Eigenpairs in descending order. lam_A[:n_sink] = +inf marks sink directions (always removed)."""

    lam_A: torch.Tensor
    U_A: torch.Tensor
    lam_S: torch.Tensor
    U_S: torch.Tensor
    n_sink: int = 0
    clamped_A: int = 0
    clamped_S: int = 0

    @property
    def d_in(self) -> int:
        return self.U_A.shape[0]

    @property
    def d_out(self) -> int:
        return self.U_S.shape[0]


def sym_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """eigh of a symmetric PSD matrix in float64, eigenvalues descending, negatives clamped to 0 (counted)."""
    M = M.double()
    M = 0.5 * (M + M.T)
    lam, U = torch.linalg.eigh(M)
    lam, U = lam.flip(0), U.flip(1)
    n_neg = int((lam < 0).sum())
    return lam.clamp_min(0.0), U, n_neg


def _sink_split(A_sink: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, Q): V spans the sink directions holding `energy` of A_sink's trace, Q the orthogonal complement
    (both from one eigh of A_sink)."""
    lam, U, _ = sym_eigh(A_sink)
    total = float(lam.sum())
    if total <= 0:
        return U[:, :0], U
    r = min(energy_rank(lam, energy, total) + 1, lam.numel())
    return U[:, :r], U[:, r:]


def eigendecompose(stats: LayerStats, sink_energy: float = 0.99) -> LayerEigen:
    A, S = stats.factors()
    lam_S, U_S, neg_S = sym_eigh(S)
    A_sink = stats.sink_factor()
    if A_sink is None:
        lam_A, U_A, neg_A = sym_eigh(A)
        return LayerEigen(lam_A, U_A, lam_S, U_S, 0, neg_A, neg_S)
    V, Q = _sink_split(A_sink, sink_energy)
    r = V.shape[1]
    lam_c, W, neg_A = sym_eigh(Q.T @ A @ Q)
    U_A = torch.cat([V, Q @ W], dim=1)
    lam_A = torch.cat([torch.full((r,), float("inf"), dtype=torch.float64, device=A.device), lam_c])
    return LayerEigen(lam_A, U_A, lam_S, U_S, r, neg_A, neg_S)


def top_energy_fraction(lam: torch.Tensor, k: int = 1) -> float:
    """Share of the trace held by the k largest finite eigenvalues (how dominated a factor is)."""
    f = lam[torch.isfinite(lam)]
    tot = float(f.sum())
    return float(f[:k].sum()) / tot if tot > 0 else 0.0
