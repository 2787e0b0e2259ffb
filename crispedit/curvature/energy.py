"""The energy rule behind every threshold: the largest curvature values holding a share γ of the total.

One primitive serves all of them: the Kronecker products λ_S,i·λ_A,j of the K-FAC masks (`masks.py`), the
corrected EK-FAC eigenvalues (`ekfac.py`), A's eigenvalues for the Adam-NSCL baseline (`api.py`) and the sink
activations' second moment (`eigen.py`). The rule: sort descending and remove values until their running
sum first reaches γ·total; the value where that happens is removed too.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def energy_rank(values_desc: torch.Tensor, fraction: float, total: float | None = None) -> int:
    """Index k (0-based) of the value at which the running sum of `values_desc` (sorted descending, ≥ 0)
    first reaches `fraction`·total: the k + 1 largest values hold at least that share.

    `total` defaults to the sum of the values; callers that define the energy otherwise (the product of two
    factors' traces) pass theirs. May return len(values) when rounding keeps the running sum below the target.
    """
    cum = torch.cumsum(values_desc, 0)
    total = float(values_desc.sum()) if total is None else total
    return int(torch.searchsorted(cum, torch.tensor(fraction * total, dtype=cum.dtype, device=cum.device)).item())


def energy_cutoff_values(values: Sequence[torch.Tensor] | torch.Tensor, gamma: float,
                         total: float | None = None) -> float:
    """Cutoff τ over non-negative curvature values: the values ≥ τ (the largest ones) hold ≥ γ of the sum of
    the finite values; +inf when nothing needs removing (γ = 0 or no curvature).

    Args:
        values: one tensor or several (thresholded together), any shapes; non-finite entries are ignored.
        gamma: the share γ in [0, 1).
        total: the energy γ is a share of (default: the sum of the finite values).

    Raises:
        ValueError: γ outside [0, 1).
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if isinstance(values, torch.Tensor):
        values = [values]
    flat = torch.cat([v.reshape(-1).double() for v in values])
    flat = flat[torch.isfinite(flat)].clamp_min(0.0)
    total = float(flat.sum()) if total is None else total
    if gamma == 0.0 or total <= 0.0 or flat.numel() == 0:
        return math.inf
    s, _ = torch.sort(flat, descending=True)
    k = energy_rank(s, gamma, total)
    return float(s[min(k, s.numel() - 1)])


__all__ = ["energy_cutoff_values", "energy_rank"]
