"""Energy-threshold masks over Kronecker eigenvalue products λ_S,i · λ_A,j.

γ removes the largest products that together hold a γ fraction of the total curvature energy (their sum);
what is left is the low-curvature subspace edits may move in. Scope "layer" thresholds each target on its
own; scope "global" ranks the products of all targets together, so layers whose curvature is larger
(in the same units: all blocks belong to one Gauss-Newton matrix) give up more directions.
Products involving sink directions (λ_A = +inf) are always removed and do not enter the energy.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from crispedit.config import Scope
from crispedit.curvature.eigen import LayerEigen
from crispedit.curvature.stats import LayerStats
from crispedit.curvature.energy import energy_cutoff_values

EXACT_SORT_LIMIT = 1 << 25  # above this many products, find the cutoff by bisection instead of a full sort
SCOPES = Scope.values()


def _finite(e: LayerEigen) -> tuple[torch.Tensor, torch.Tensor]:
    return e.lam_S, e.lam_A[e.n_sink :]


def _energy_at_or_above(eigs: list[LayerEigen], tau: float) -> float:
    """Σ of products ≥ tau, in O(d_out log d_in) per layer (eigenvalues are sorted descending)."""
    total = 0.0
    for e in eigs:
        lS, lA = _finite(e)
        asc = lA.flip(0)
        prefix = torch.cat([asc.new_zeros(1), torch.cumsum(asc, 0)])  # prefix[m] = sum of m smallest
        pos = lS > 0
        if tau <= 0:
            total += float(lS.sum() * lA.sum())
            continue
        need = tau / lS[pos]
        first = torch.searchsorted(asc, need, right=False)  # index of first λ_A >= need
        total += float((lS[pos] * (prefix[-1] - prefix[first])).sum())
    return total


def energy_cutoff(eigs: list[LayerEigen], gamma: float, exact: bool | None = None) -> float:
    """The smallest removed product value τ: products ≥ τ are removed and hold ≥ γ of the energy.

    Returns +inf when nothing needs removing (γ = 0 or zero curvature)."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    n = sum(e.lam_S.numel() * (e.lam_A.numel() - e.n_sink) for e in eigs)
    total = sum(float(_finite(e)[0].sum() * _finite(e)[1].sum()) for e in eigs)
    if gamma == 0.0 or total <= 0.0 or n == 0:
        return math.inf
    if exact is None:
        exact = n <= EXACT_SORT_LIMIT
    if exact:
        return energy_cutoff_values([torch.outer(*_finite(e)) for e in eigs], gamma, total=total)
    # Bisection in log space on τ: E(τ) = energy of products ≥ τ is non-increasing in τ.
    hi = max(float(_finite(e)[0][0] * _finite(e)[1][0]) for e in eigs if _finite(e)[1].numel())
    lo = hi * 1e-300
    target = gamma * total
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _energy_at_or_above(eigs, mid) >= target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-14:
            break
    return lo


def keep_mask(e: LayerEigen, cutoff: float) -> torch.Tensor:
    """Bool (d_out, d_in): True where λ_S,i·λ_A,j < cutoff (kept, low curvature)."""
    prods = torch.outer(e.lam_S, e.lam_A)
    keep = prods < cutoff
    keep[:, : e.n_sink] = False
    return keep


def build_masks(eigs: Mapping[str, LayerEigen], gamma: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    if scope not in SCOPES:
        raise ValueError(f"unknown threshold scope {scope!r}; expected one of {SCOPES}")
    if scope == "global":
        cut = energy_cutoff(list(eigs.values()), gamma)
        return {k: keep_mask(e, cut) for k, e in eigs.items()}
    return {k: keep_mask(e, energy_cutoff([e], gamma)) for k, e in eigs.items()}


def basis_energies(e: LayerEigen, stats: LayerStats) -> torch.Tensor:
    """[d_out, d_in] energy of the K-FAC block S ⊗ A of `stats` on each direction u_i ⊗ v_j of the basis `e`:
    (u_iᵀ S u_i)(v_jᵀ A v_j), the diagonal of the block in that basis (their sum is the block's trace; exactly the
    eigenvalue products when `e` is the block's own eigenbasis). Sink columns (always removed) get 0."""
    A, S = stats.factors()
    dS = torch.einsum("ij,ik,kj->j", e.U_S, S.to(e.U_S), e.U_S).clamp_min(0.0)
    dA = torch.einsum("ij,ik,kj->j", e.U_A, A.to(e.U_A), e.U_A).clamp_min(0.0)
    dA[: e.n_sink] = 0.0
    return torch.outer(dS, dA)


def joint_keep_mask(e: LayerEigen, constraints: Sequence[tuple[LayerStats, float]]) -> torch.Tensor:
    """Bool (d_out, d_in) over the basis `e`: a direction is kept when, for every (statistics, γ) constraint, it is
    not among the directions of largest energy (`basis_energies`) that hold γ of that constraint's energy. Each
    constraint gets its own budget, so one cannot displace another's (sink columns are always removed)."""
    keep = torch.ones(e.d_out, e.d_in, dtype=torch.bool, device=e.U_S.device)
    keep[:, : e.n_sink] = False
    for stats, gamma in constraints:
        energy = basis_energies(e, stats)
        keep &= energy < energy_cutoff_values(energy, gamma)
    return keep


def mask_report(e: LayerEigen, keep: torch.Tensor) -> dict:
    """Kept fraction of directions and of curvature energy for one layer."""
    prods = torch.outer(*_finite(e))
    k = keep[:, e.n_sink :]
    tot = float(prods.sum())
    return {
        "kept_fraction": float(keep.double().mean()),
        "kept_energy_fraction": float(prods[k].sum()) / tot if tot > 0 else 1.0,
        "removed_directions": int((~keep).sum()),
    }
