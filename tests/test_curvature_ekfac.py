"""EK-FAC (crispedit/curvature/ekfac.py) against exact oracles on tiny float64 MLP heads: the corrected eigenvalues
are the exact Gauss-Newton diagonal in K-FAC's eigenbasis, per-example gradients give the same sums, sampled
labels converge to exact ones, and the masks follow K-FAC's energy rule. (Moved from test_study.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import head_blocks, tiny_data, tiny_head
from crispedit.curvature.collect import CollectConfig, accumulate_batch
from crispedit.curvature.eigen import eigendecompose
from crispedit.curvature.ekfac import EKFACAccumulator, EKFACEigen, ekfac_masks
from crispedit.curvature.masks import build_masks
from crispedit.curvature.projector import KroneckerProjector, explicit_projector
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.study.curvatures import compute_basis, exact_matrix, kfac_stats

pytest.importorskip("curvlinops")


@pytest.mark.parametrize("n", [1, 9])
def test_ekfac_eigenvalues_are_rotated_exact_ggn_diagonal(n):
    """One position per example, exact labels: λ_ij = diag((U_S ⊗ U_A)ᵀ G (U_S ⊗ U_A)) for ANY number of
    examples (George et al.'s correction is the exact diagonal in K-FAC's eigenbasis); with one example
    it also equals K-FAC's own products λ_S,i λ_A,j."""
    head = tiny_head(5)
    x, y = tiny_data(n, seed=6)
    G = exact_matrix("ggn", head, x, y)
    basis = compute_basis("ekfac", head, x, y)
    stats = kfac_stats(head, x, y)
    for name, blk in head_blocks(G, head).items():
        e = basis.eks[name]
        U = torch.kron(e.U_S, e.U_A)
        want = torch.diagonal(U.T @ blk @ U).reshape(e.lam.shape)
        torch.testing.assert_close(e.lam, want, rtol=1e-8, atol=1e-12)
        if n == 1:
            le = eigendecompose(stats[name])
            torch.testing.assert_close(e.lam, torch.outer(le.lam_S, le.lam_A), rtol=1e-7, atol=1e-12)
        else:  # EK-FAC is the Frobenius-closest diagonal in this basis: never worse than K-FAC
            le = eigendecompose(stats[name])
            kfac = U @ torch.diag(torch.outer(le.lam_S, le.lam_A).reshape(-1)) @ U.T
            ekfac = U @ torch.diag(e.lam.reshape(-1)) @ U.T
            assert torch.linalg.norm(ekfac - blk) <= torch.linalg.norm(kfac - blk) + 1e-12


def test_ekfac_with_positions_matches_per_example_weight_gradients():
    """Sequences (weight sharing over positions) with padding and empirical labels: λ = (1/N_valid) Σ_n
    (U_Sᵀ ∇_W ℓ_n U_A)², with ∇_W ℓ_n the per-example weight gradient from autograd (independent oracle)."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(5, 7).double(), nn.Linear(7, 4).double()
    B, T = 4, 3
    x = torch.randn(B, T, 5, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 2] = False
    valid[3, 0] = False
    y = torch.randint(0, 4, (B, T))
    y[~valid] = -100
    modules = {"lin1": lin1, "lin2": lin2}

    def fwd(inp):
        return lin2(torch.tanh(lin1(inp)))

    stats = KFACStats({k: LayerStats.zeros(m.in_features, m.out_features) for k, m in modules.items()})
    for p in list(lin1.parameters()) + list(lin2.parameters()):
        p.requires_grad_(False)
    with torch.enable_grad():
        accumulate_batch(stats, modules, lambda: fwd(x), y, valid, CollectConfig(labels="empirical"))
        eigs = {k: eigendecompose(s) for k, s in stats.items()}
        acc = EKFACAccumulator(eigs, chunk=2)
        acc.accumulate_batch(modules, lambda: fwd(x), y, valid, CollectConfig(labels="empirical"))
    res = acc.result()
    for p in list(lin1.parameters()) + list(lin2.parameters()):
        p.requires_grad_(True)
    want = {k: torch.zeros(m.out_features, m.in_features, dtype=torch.float64) for k, m in modules.items()}
    for b in range(B):
        loss = nn.functional.cross_entropy(fwd(x[b]), y[b], reduction="sum", ignore_index=-100)
        gw = torch.autograd.grad(loss, [lin1.weight, lin2.weight])
        for (k, e), g in zip(eigs.items(), gw):
            want[k] += (e.U_S.T @ g @ e.U_A) ** 2
    for k in modules:
        torch.testing.assert_close(res[k].lam, want[k] / int(valid.sum()), rtol=1e-9, atol=1e-14)


def test_ekfac_sampled_labels_match_exact_in_expectation():
    """Labels drawn from the model's predictive distribution give the exact EK-FAC eigenvalues in
    expectation (E_ŷ[∇ℓ_ŷ ∇ℓ_ŷᵀ] = diag(p) − ppᵀ); with many Monte-Carlo samples they agree closely."""
    head = tiny_head(11)
    x, y = tiny_data(3, seed=12)
    exact = compute_basis("ekfac", head, x, y).eks
    eigs = {k: eigendecompose(s) for k, s in kfac_stats(head, x, y).items()}
    modules = {"fc2": head.fc2, "fc3": head.fc3}
    acc = EKFACAccumulator(eigs)
    for p in head.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        acc.accumulate_batch(modules, lambda: head(x), y, torch.ones(3, dtype=torch.bool),
                             CollectConfig(labels="sampled", mc_samples=3000), torch.Generator().manual_seed(0))
    for k, e in acc.result().items():
        err = (e.lam - exact[k].lam).abs().max() / exact[k].lam.max()
        assert err < 0.03, (k, float(err))  # empirical labels would be off by ~50 %


def test_ekfac_masks_follow_the_kfac_energy_rule_and_give_exact_projectors():
    """Masks from values equal build_masks when the values are K-FAC's products (same cutoff rule); a
    non-staircase EK-FAC mask still gives the exact orthogonal projector."""
    head = tiny_head(7)
    x, y = tiny_data(30, seed=8)
    stats = kfac_stats(head, x, y)
    eigs = {k: eigendecompose(s) for k, s in stats.items()}
    as_values = {k: EKFACEigen(e.U_S, e.U_A, torch.outer(e.lam_S, e.lam_A)) for k, e in eigs.items()}
    for scope in ("layer", "global"):
        for gamma in (0.0, 0.5, 0.9, 0.999):
            want = build_masks(eigs, gamma, scope)
            got = ekfac_masks(as_values, gamma, scope)
            for k in eigs:
                assert torch.equal(want[k], got[k]), (scope, gamma, k)
    ek = compute_basis("ekfac", head, x, y).eks["fc2"]
    keep = ekfac_masks({"fc2": ek}, 0.9)["fc2"]
    P = explicit_projector(ek.U_S, ek.U_A, keep)
    proj = KroneckerProjector(ek.U_S, ek.U_A, keep, dtype=torch.float64)
    Q = torch.randn(ek.U_S.shape[0], ek.U_A.shape[0], dtype=torch.float64)
    torch.testing.assert_close(proj(Q).reshape(-1), P @ Q.reshape(-1), rtol=1e-10, atol=1e-12)
    removed = ek.lam[~keep].sum() / ek.lam.sum()
    assert removed >= 0.9 and (~keep).sum() < keep.numel()
