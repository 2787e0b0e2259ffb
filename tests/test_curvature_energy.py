"""The one energy rule (crispedit/curvature/energy.py) and its four users: K-FAC masks, EK-FAC masks, the
Adam-NSCL baseline and the sink split all remove the largest values until they hold a share γ of the total."""

from __future__ import annotations

import math

import pytest
import torch

from crispedit.curvature.api import nscl_keep_columns
from crispedit.curvature.eigen import LayerEigen, _sink_split
from crispedit.curvature.energy import energy_cutoff_values, energy_rank
from crispedit.curvature.masks import energy_cutoff


def test_energy_cutoff_values():
    v = torch.tensor([5.0, 3.0, 1.0, 1.0, 0.0])
    assert energy_cutoff_values(v, 0.0) == math.inf
    assert energy_cutoff_values(v, 0.5) == 5.0  # 5/10 reaches 0.5
    assert energy_cutoff_values(v, 0.51) == 3.0
    assert energy_cutoff_values(v, 0.95) == 1.0
    with pytest.raises(ValueError):
        energy_cutoff_values(v, 1.0)


@pytest.mark.parametrize("fraction, k", [(0.0, 0), (0.5, 0), (0.51, 1), (0.8, 1), (0.81, 2), (0.9, 2), (0.95, 3), (0.99, 4)])
def test_energy_rank_is_the_last_value_needed_to_reach_the_share(fraction, k):
    v = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5], dtype=torch.float64)  # total 10
    assert energy_rank(v, fraction) == k
    assert v[: k + 1].sum() >= fraction * v.sum() and (k == 0 or v[:k].sum() < fraction * v.sum())


def _eigen(seed: int, d_out: int = 5, d_in: int = 7, n_sink: int = 1) -> LayerEigen:
    g = torch.Generator().manual_seed(seed)
    lam_S = torch.rand(d_out, generator=g, dtype=torch.float64).sort(descending=True).values
    lam_A = torch.rand(d_in, generator=g, dtype=torch.float64).sort(descending=True).values
    lam_A[:n_sink] = math.inf
    return LayerEigen(lam_A, torch.eye(d_in, dtype=torch.float64), lam_S ** 3, torch.eye(d_out, dtype=torch.float64),
                      n_sink)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 0.999])
def test_kfac_cutoff_is_the_energy_rule_on_products_by_sort_and_by_bisection(gamma):
    eigs = [_eigen(0), _eigen(1, d_out=3, d_in=4, n_sink=0)]
    prods = [torch.outer(e.lam_S, e.lam_A[e.n_sink:]) for e in eigs]
    total = sum(float(e.lam_S.sum() * e.lam_A[e.n_sink:].sum()) for e in eigs)
    want = energy_cutoff_values(prods, gamma, total=total)
    assert energy_cutoff(eigs, gamma, exact=True) == want
    bisected = energy_cutoff(eigs, gamma, exact=False)
    assert bisected == want or math.isclose(bisected, want, rel_tol=1e-12)


def test_nscl_and_sink_split_remove_the_same_count_as_the_rule():
    e = _eigen(2, d_in=9, n_sink=2)
    lam = e.lam_A[e.n_sink:]
    for gamma in (0.2, 0.5, 0.9):
        keep = nscl_keep_columns(e, gamma)
        removed = int((~keep[e.n_sink:]).sum())
        assert removed == energy_rank(lam, gamma) + 1
        assert not keep[: e.n_sink].any()
        assert lam[:removed].sum() >= gamma * lam.sum() > lam[: removed - 1].sum()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 4, generator=g, dtype=torch.float64) * torch.tensor([5.0, 2.0, 1.0, 0.1], dtype=torch.float64)
    V, Q = _sink_split(X.T @ X, 0.9)
    lam = torch.linalg.eigvalsh(X.T @ X).flip(0)
    assert V.shape[1] == energy_rank(lam, 0.9) + 1 and V.shape[1] + Q.shape[1] == 4
    torch.testing.assert_close(V.T @ Q, torch.zeros(V.shape[1], Q.shape[1], dtype=torch.float64), atol=1e-12,
                               rtol=0)


def _psd(d: int, rank: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return x @ x.T


def test_basis_energies_are_the_diagonal_of_the_kronecker_block_in_that_basis():
    """Oracle: diag((U_S ⊗ U_A)ᵀ (S ⊗ A) (U_S ⊗ U_A)) from the explicit 24 × 24 block, in a basis that is not the
    block's own (the eigenbasis of a merged pair of factors); in its own eigenbasis they are the eigenvalue products."""
    from crispedit.curvature.eigen import eigendecompose
    from crispedit.curvature.masks import basis_energies
    from crispedit.curvature.stats import LayerStats

    g = torch.Generator().manual_seed(0)
    cap = LayerStats(A=_psd(6, 6, g), S=_psd(4, 4, g), n=3)
    edits = LayerStats(A=_psd(6, 2, g), S=_psd(4, 1, g), n=2)
    merged = eigendecompose(cap.clone().add_(edits))
    for stats in (cap, edits):
        A, S = stats.factors()
        B = torch.kron(merged.U_S, merged.U_A)
        want = torch.diagonal(B.T @ torch.kron(S, A) @ B).reshape(4, 6)
        got = basis_energies(merged, stats)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
        assert float(got.sum()) == pytest.approx(float(torch.trace(S) * torch.trace(A)), rel=1e-10)
    own = eigendecompose(cap)
    assert torch.allclose(basis_energies(own, cap), torch.outer(own.lam_S, own.lam_A), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_joint_mask_is_the_intersection_of_each_constraints_own_energy_rule(gamma):
    """One constraint in its own eigenbasis gives exactly the standard per-layer mask; several give the
    intersection of their masks, each removing directions that hold ≥ γ of its own energy (sink columns always)."""
    from crispedit.curvature.eigen import eigendecompose
    from crispedit.curvature.masks import basis_energies, build_masks, joint_keep_mask
    from crispedit.curvature.stats import LayerStats

    g = torch.Generator().manual_seed(1)
    cap = LayerStats(A=_psd(7, 7, g), S=_psd(5, 5, g), n=4)
    own = eigendecompose(cap)
    assert torch.equal(joint_keep_mask(own, [(cap, gamma)]), build_masks({"w": own}, gamma)["w"])
    edits = LayerStats(A=_psd(7, 2, g), S=_psd(5, 2, g), n=1)
    merged = eigendecompose(cap.clone().add_(edits))
    merged.lam_A[0], merged.n_sink = math.inf, 1  # one sink column
    both = joint_keep_mask(merged, [(cap, gamma), (edits, 0.8)])
    singles = [joint_keep_mask(merged, [(s, gm)]) for s, gm in ((cap, gamma), (edits, 0.8))]
    assert torch.equal(both, singles[0] & singles[1]) and not both[:, 0].any()
    for stats, gm in ((cap, gamma), (edits, 0.8)):
        e = basis_energies(merged, stats)
        assert float(e[~both].sum()) >= gm * float(e.sum()) - 1e-12
    assert both.sum() < singles[0].sum()  # the edits' constraint removes directions the capability keeps
