"""The study's exact curvature (closed-form GGN / Hessian products, live block, exact trace) against
curvlinops, and the partial eigensolver's removed subspace against a dense eigh."""

from __future__ import annotations

import math

import pytest
import torch

from crispedit.study.curvatures import DenseBasis, compute_basis, exact_basis, exact_matrix, lanczos_max
from crispedit.study.exact import HeadCurvature
from crispedit.study.lenet import Head
from crispedit.study.spectrum import (Spectrum, Tridiagonal, dense_top, lanczos_for_gamma, lanczos_top, removed_count,
                                      tridiagonal_partial)

curvlinops = pytest.importorskip("curvlinops")


def relu_features(n: int, d_in: int, dead: int, seed: int) -> torch.Tensor:
    """Non-negative features with `dead` columns that are zero on every example (like LeNet's fc1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, d_in, generator=g, dtype=torch.float64) + 0.3)
    x[:, torch.randperm(d_in, generator=g)[:dead]] = 0.0
    return x


def tiny_case(seed: int = 0):
    torch.manual_seed(seed)
    head = Head(5, d_in=6, classes=4).double()
    with torch.no_grad():  # non-zero biases; one hidden unit never active
        head.fc2.bias.normal_()
        head.fc3.bias.normal_()
        head.fc2.bias[2] = -50.0
    x = relu_features(30, 6, dead=1, seed=seed + 1)
    y = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(seed + 2))
    return head, x, y


def make_small_case():
    """The 16-unit head (120 → 16 → 10, 2,080 weights, as in the small study) trained for a while on a
    teacher's labels over ReLU features with 30 dead columns, so that its spectrum decays like a trained
    network's; 600 curvature examples."""
    torch.manual_seed(0)
    x = relu_features(1600, 120, dead=30, seed=3)
    teacher = torch.randn(120, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = (x @ teacher).argmax(-1)
    head = Head(16).double()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(1500):
        i = (step * 100) % 1000
        loss = torch.nn.functional.cross_entropy(head(x[i:i + 100]), y[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in head.parameters():
        p.requires_grad_(False)
    return head, x[1000:], y[1000:]


@pytest.fixture(scope="module")
def small_case():
    return make_small_case()


def subspace_distance(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖U Uᵀ − V Vᵀ‖₂ for orthonormal U, V: the sine of the largest principal angle, ‖(I − V Vᵀ) U‖₂
    when the dimensions agree (accurate for tiny angles, unlike √(1 − σ_min(VᵀU)²)), else 1."""
    if U.shape[1] != V.shape[1]:
        return 1.0
    return float(torch.linalg.matrix_norm(U - V @ (V.T @ U), ord=2))


# ------------------------------------------------------------------------------------ HeadCurvature

@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("seed", [0, 1])
def test_head_curvature_equals_curvlinops(kind, seed):
    """Dense live block, products and diagonal equal curvlinops' matrix; the rows outside the live block
    are exactly zero there; the trace of the Hessian equals the trace of the GGN."""
    head, x, y = tiny_case(seed)
    M = exact_matrix(kind, head, x, y)
    hc = HeadCurvature(kind, head, x, y)
    live = hc.live_mask()
    assert hc.d == M.shape[0] and int(live.sum()) == hc.d_live < hc.d
    assert torch.equal(M[~live], torch.zeros_like(M[~live]))
    Ml = M[live][:, live]
    torch.testing.assert_close(hc.dense(), Ml, rtol=1e-10, atol=1e-13)
    V = torch.randn(hc.d_live, 4, dtype=torch.float64)
    torch.testing.assert_close(hc.matmat(V), Ml @ V, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(hc.matmat(V[:, 0]), Ml @ V[:, 0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(hc.diagonal(), torch.diagonal(Ml), rtol=1e-10, atol=1e-14)
    assert hc.trace() == pytest.approx(float(torch.trace(M)), rel=1e-12)
    if kind == "hessian":
        G = exact_matrix("ggn", head, x, y)
        assert (M - G).abs().max() > 1e-3  # the residual term is there ...
        torch.testing.assert_close(torch.diagonal(M), torch.diagonal(G), rtol=1e-12, atol=1e-14)  # ... off the diagonal


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_head_curvature_equals_curvlinops_on_the_16_unit_head(kind, small_case):
    head, x, y = small_case
    M = exact_matrix(kind, head, x, y)
    hc = HeadCurvature(kind, head, x, y)
    live = hc.live_mask()
    assert hc.d == 2080 and hc.d_live <= 16 * 90 + 160
    assert torch.equal(M[~live], torch.zeros_like(M[~live]))
    torch.testing.assert_close(hc.dense(), M[live][:, live], rtol=1e-9, atol=1e-13)


def test_bad_inputs_are_refused():
    head, x, y = tiny_case()
    with pytest.raises(ValueError, match="unknown exact curvature"):
        HeadCurvature("fisher", head, x, y)
    with pytest.raises(ValueError, match="expected features"):
        HeadCurvature("ggn", head, x, y[:-1])


# ------------------------------------------------------------------------------------ the γ rule

def test_n_removed_follows_the_energy_rule_and_says_when_undecided():
    lam = torch.tensor([5.0, 3.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    full = Spectrum(lam, torch.eye(5, dtype=torch.float64), 10.0, True, 0, "dense")
    assert [full.n_removed(g) for g in (0.0, 0.5, 0.51, 0.8, 0.85, 0.95)] == [0, 1, 2, 2, 4, 4]
    part = Spectrum(lam[:3], torch.eye(5, dtype=torch.float64)[:, :3], 10.0, False, 0, "lanczos")
    assert part.n_removed(0.5) == 1 and part.n_removed(0.8) == 2
    assert part.n_removed(0.85) is None  # the cutoff value 1.0 is tied with an uncomputed value
    assert part.n_removed(0.95) is None  # the 3 computed values hold only 90 %
    with pytest.raises(ValueError):
        part.n_removed(1.0)


# ------------------------------------------------------------------------------------ partial vs dense

KS = (0.5, 1.5, 2.5)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_partial_removed_subspace_equals_dense_on_the_16_unit_head(kind, small_case):
    """The Lanczos route of exact_basis (hint → partial) removes the same number of directions as a dense
    eigh of curvlinops' full 2,080² matrix and the same subspace: ‖P_partial − P_dense‖₂ (the sine of the
    largest principal angle) ≤ 1e-6, while a subspace one direction off is at distance 1."""
    head, x, y = small_case
    M = exact_matrix(kind, head, x, y)
    dense = dense_top(M)  # the oracle: all 2,080 eigenpairs, eigenvalues clamped at 0
    for k in KS:
        gamma = 1 - 10 ** (-k)
        r = dense.n_removed(gamma)
        basis = exact_basis(kind, head, x, y, (gamma,), hint=r, cap=1000)
        assert basis.spectrum.solver == "lanczos", (k, basis.info)
        assert basis.n_removed(gamma) == r, (k, r, basis.info)
        U_part = torch.zeros(2080, r, dtype=torch.float64)
        U_part[basis.live] = basis.spectrum.U[:, :r]
        dist = subspace_distance(U_part, dense.U[:, :r])
        assert dist < 1e-6, (kind, k, r, dist)
        assert subspace_distance(dense.U[:, :r], dense.U[:, :r + 1]) == 1.0
        assert subspace_distance(dense.U[:, :r], torch.cat([dense.U[:, :r - 1], dense.U[:, r:r + 1]], 1)) > 0.99
        # the eigenvalues that decide r agree with the dense ones
        torch.testing.assert_close(basis.lam[:r], dense.lam[:r], rtol=1e-9, atol=1e-12)


def test_partial_with_curvlinops_operator_equals_dense(small_case):
    """The same partial eigensolver driven by curvlinops' GGNLinearOperator (the full 2,080-dim operator,
    dead coordinates included) and the exact trace: same r and subspace as the dense eigh."""
    from curvlinops import GGNLinearOperator
    from torch import nn

    head, x, y = small_case
    M = exact_matrix("ggn", head, x, y)
    dense = dense_top(M)
    params = [head.fc2.weight, head.fc3.weight]
    for p in params:
        p.requires_grad_(True)
    try:
        op = GGNLinearOperator(head, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
        total = HeadCurvature("ggn", head, x, y).trace()
        for k in (0.5, 1.0):
            gamma = 1 - 10 ** (-k)
            r = dense.n_removed(gamma)
            top = lanczos_for_gamma(lambda V: op @ V, 2080, total, gamma, m0=r // 2, max_m=1000)
            assert top is not None and top.n_removed(gamma) == r
            assert subspace_distance(top.U[:, :r], dense.U[:, :r]) < 1e-6
    finally:
        for p in params:
            p.requires_grad_(False)


def test_lanczos_grows_past_a_small_hint_and_gives_up_past_the_cap(small_case):
    head, x, y = small_case
    hc = HeadCurvature("ggn", head, x, y)
    dense = dense_top(hc.dense())
    gamma = 1 - 10 ** -2.5
    r = dense.n_removed(gamma)
    top = lanczos_for_gamma(hc.matmat, hc.d_live, hc.trace(), gamma, m0=4, max_m=4 * r)
    assert top is not None and top.n_removed(gamma) == r and top.lam.numel() > r
    assert lanczos_for_gamma(hc.matmat, hc.d_live, hc.trace(), gamma, m0=4, max_m=r // 2) is None
    # exact_basis falls back to the dense route when the hint is beyond the cap
    basis = exact_basis("ggn", head, x, y, (gamma,), hint=lanczos_max(hc.d_live) + 1)
    assert basis.spectrum.solver == "tridiagonal" and basis.n_removed(gamma) == r


def test_dense_route_serves_every_gamma_and_its_total_is_the_exact_trace(small_case):
    head, x, y = small_case
    gammas = tuple(1 - 10 ** (-k) for k in (0.1, 1, 3, 5.5, 7))
    basis = exact_basis("ggn", head, x, y, gammas)
    assert basis.spectrum.values_complete and basis.spectrum.solver == "tridiagonal"
    assert basis.info["trace_check"] < 1e-12
    rs = [basis.n_removed(g) for g in gammas]
    assert rs == sorted(rs) and rs[0] >= 1 and rs[-1] < basis.live.sum()
    hb = exact_basis("hessian", head, x, y, gammas)
    trace = HeadCurvature("hessian", head, x, y).trace()
    assert hb.spectrum.n_negative > 0  # clamped negatives add their mass to the total
    assert hb.spectrum.total == pytest.approx(trace + hb.spectrum.negative_mass, rel=1e-12)


def test_dense_projector_removes_gamma_energy_and_is_orthogonal(small_case):
    """P from either side (removed or kept eigenvectors) is symmetric, idempotent, leaves the dead
    coordinates alone, and the removed eigenvalues hold ≥ γ of the energy (and one fewer would not)."""
    head, x, y = small_case
    basis = compute_basis("hessian", head, x, y, gammas=(0.5, 0.99, 1 - 1e-7))
    assert isinstance(basis, DenseBasis)
    shapes = basis.shapes
    n2 = math.prod(shapes[0])
    E = torch.eye(2080, dtype=torch.float32)
    for gamma in (0.5, 0.99, 1 - 1e-7):
        proj = basis.projector(gamma)
        P = torch.stack([torch.cat([t.reshape(-1) for t in proj([c[:n2].reshape(shapes[0]), c[n2:].reshape(shapes[1])])])
                         for c in E], dim=1).double()
        torch.testing.assert_close(P, P.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
        dead = ~basis.live
        torch.testing.assert_close(P[dead][:, dead], torch.eye(int(dead.sum()), dtype=torch.float64))
        r = proj.n_removed
        lam = basis.lam
        assert lam[:r].sum() >= gamma * basis.spectrum.total > lam[: r - 1].sum()
        assert abs(float(torch.trace(P)) - (2080 - r)) < 1e-2
        assert proj.kept_fraction == pytest.approx((2080 - r) / 2080)


def test_removed_count_helper():
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert removed_count(lam, 8.0, 0.5) == 1 and removed_count(lam, 8.0, 0.9) == 4


def test_lanczos_top_refuses_impossible_sizes():
    with pytest.raises(ValueError):
        lanczos_top(lambda V: V, 1, 1, 1.0)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_tridiagonal_route_equals_full_eigh(kind, small_case):
    """One dsytrd, all eigenvalues, eigenvectors of one end only: the values equal torch's eigh, and both
    the removed (top) and the kept (bottom, with the zero-curvature cluster) subspaces equal the dense ones
    and are orthonormal."""
    head, x, y = small_case
    M = HeadCurvature(kind, head, x, y).dense()
    dense = dense_top(M)
    n = M.shape[0]
    tri = Tridiagonal(M)
    torch.testing.assert_close(tri.eigenvalues().flip(0).clamp_min(0.0), dense.lam, rtol=0, atol=1e-12)
    for k in (1.0, 7.0):
        gamma = 1 - 10 ** (-k)
        r = dense.n_removed(gamma)
        spec = tridiagonal_partial(M, (gamma,))
        V, removed, r2 = spec.vectors(gamma)
        assert r2 == r and removed == (r <= n - r), (k, r, n)
        ref = dense.U[:, :r] if removed else dense.U[:, r:]
        torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)
        assert subspace_distance(V, ref) < 1e-6, (kind, k)
    both = tridiagonal_partial(M, (0.9, 1 - 1e-7))  # several γ: the top end serves them all
    for gamma in (0.9, 1 - 1e-7):
        V, removed, r = both.vectors(gamma)
        assert removed and subspace_distance(V, dense.U[:, :r]) < 1e-6
    kept_only = tridiagonal_partial(M, (1 - 1e-7,))
    assert kept_only.first > 0  # at k = 7 the kept side is the narrower one here ...
    with pytest.raises(ValueError, match="neither"):  # ... and it cannot serve a small γ
        kept_only.vectors(0.5)


def test_tridiagonal_falls_back_when_mrrr_fails(small_case, monkeypatch):
    """A failed MRRR end (dstemr info ≠ 0, as happened once on the zero-curvature cluster) falls back to the
    other end, then to a full eigh; the subspace is the same either way."""
    head, x, y = small_case
    M = HeadCurvature("ggn", head, x, y).dense()
    dense = dense_top(M)
    gamma = 1 - 1e-7
    r = dense.n_removed(gamma)
    orig = Tridiagonal.eigenvectors

    def kept_end_fails(self, lo, hi):
        if lo == 0:
            raise FloatingPointError("dstemr failed (info=22)")
        return orig(self, lo, hi)

    monkeypatch.setattr(Tridiagonal, "eigenvectors", kept_end_fails)
    spec = tridiagonal_partial(M, (gamma,))
    V, removed, r2 = spec.vectors(gamma)
    assert removed and r2 == r and spec.solver == "tridiagonal"
    assert subspace_distance(V, dense.U[:, :r]) < 1e-6

    def always_fails(self, lo, hi):
        raise FloatingPointError("dstemr failed (info=22)")

    monkeypatch.setattr(Tridiagonal, "eigenvectors", always_fails)
    spec = tridiagonal_partial(M, (gamma,))
    assert spec.solver.startswith("dense eigh") and spec.n_removed(gamma) == r
    assert subspace_distance(spec.vectors(gamma)[0], dense.U[:, r:] if r > 900 - r else dense.U[:, :r]) < 1e-6
