"""Curvature engine against exact oracles, in float64, on problems small enough to compute exactly."""

import math

import pytest
import torch
from torch import nn

from crispedit.curvature.collect import CollectConfig, accumulate_batch, collect_lm_stats, empty_stats
from crispedit.curvature.eigen import eigendecompose, sym_eigh
from crispedit.curvature.masks import build_masks, energy_cutoff, keep_mask, mask_report
from crispedit.curvature.projector import (
    InputNullspaceProjector,
    KroneckerProjector,
    explicit_projector,
    kept_overlap,
)
from crispedit.curvature.stats import KFACStats, LayerStats


def random_psd(d, decay=0.7, gen=None):
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    lam = decay ** torch.arange(d, dtype=torch.float64) * (1 + torch.rand(d, dtype=torch.float64, generator=gen))
    return Q @ torch.diag(lam) @ Q.T


def layer_from_factors(A, S, n=1):
    return LayerStats(A=A * n, S=S * n, n=n)


@pytest.mark.parametrize("gamma", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("form", ["dense", "block", "staircase"])
def test_matrix_free_equals_explicit_projector(gamma, form):
    g = torch.Generator().manual_seed(0)
    A, S = random_psd(7, gen=g), random_psd(5, gen=g)
    e = eigendecompose(layer_from_factors(A, S))
    keep = build_masks({"l": e}, gamma)["l"]
    P = explicit_projector(e.U_S, e.U_A, keep)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T, atol=1e-12)
    proj = KroneckerProjector(e.U_S, e.U_A, keep, dtype=torch.float64, form=form)
    for _ in range(3):
        Q = torch.randn(5, 7, dtype=torch.float64, generator=g)
        expected = (P @ Q.flatten()).reshape(5, 7)
        assert torch.allclose(proj(Q), expected, atol=1e-10)
    # Projecting twice changes nothing.
    assert torch.allclose(proj(proj(Q)), proj(Q), atol=1e-10)


def test_kept_overlap_equals_the_explicit_trace():
    """trace(P Q) / trace(P) of two Kronecker projectors from different curvature estimates, against the explicit
    (d_out·d_in)² projector matrices; 1 for a projector with itself, between 0 and 1, and 0 against keeping nothing."""
    g = torch.Generator().manual_seed(3)
    e1 = eigendecompose(layer_from_factors(random_psd(6, gen=g), random_psd(4, gen=g)))
    e2 = eigendecompose(layer_from_factors(random_psd(6, gen=g), random_psd(4, gen=g)))
    k1, k2 = build_masks({"l": e1}, 0.9)["l"], torch.rand(4, 6, generator=g) < 0.5
    p = KroneckerProjector(e1.U_S, e1.U_A, k1, dtype=torch.float64)
    q = KroneckerProjector(e2.U_S, e2.U_A, k2, dtype=torch.float64)
    P, Q = explicit_projector(e1.U_S, e1.U_A, k1), explicit_projector(e2.U_S, e2.U_A, k2)
    expected = float(torch.trace(P @ Q) / torch.trace(P))
    assert 0.05 < expected < 0.95  # a case that tells the formula from its bounds
    assert kept_overlap(p, q) == pytest.approx(expected, abs=1e-10)
    assert kept_overlap(q, p) == pytest.approx(float(torch.trace(P @ Q) / torch.trace(Q)), abs=1e-10)
    assert kept_overlap(p, p) == pytest.approx(1.0, abs=1e-10)
    none = KroneckerProjector(e2.U_S, e2.U_A, torch.zeros(4, 6, dtype=torch.bool), dtype=torch.float64)
    assert kept_overlap(p, none) == pytest.approx(0.0, abs=1e-12)


def _masks_for_rotation_tests(g):
    """A real staircase (with sink columns), a random non-monotone mask, an all-kept and an all-removed one."""
    d_out, d_in = 37, 45
    A, S = random_psd(d_in, 0.9, g), random_psd(d_out, 0.9, g)
    e = eigendecompose(layer_from_factors(A, S))
    stair = keep_mask(e, energy_cutoff([e], 0.9))
    stair[:, :2] = False  # two sink columns, removed for every row
    return e, {
        "staircase": stair,
        "random": torch.rand(d_out, d_in, generator=g) < 0.4,
        "all": torch.ones(d_out, d_in, dtype=torch.bool),
        "none": torch.zeros(d_out, d_in, dtype=torch.bool),
    }


def test_masked_rotations_equal_full_rotations_times_mask():
    g = torch.Generator().manual_seed(11)
    e, masks = _masks_for_rotation_tests(g)
    for name, keep in masks.items():
        for form in ("dense", "block", "staircase"):
            proj = KroneckerProjector(e.U_S, e.U_A, keep, dtype=torch.float64, form=form)
            M = keep.double()
            Q = torch.randn(*keep.shape, dtype=torch.float64, generator=g)
            X = torch.randn(*keep.shape, dtype=torch.float64, generator=g)
            assert torch.allclose(proj.rotate_masked(Q), (e.U_S.T @ Q @ e.U_A) * M, atol=1e-12), (name, form)
            assert torch.allclose(proj.unrotate_masked(X), e.U_S @ (X * M) @ e.U_A.T, atol=1e-12), (name, form)
            P = explicit_projector(e.U_S, e.U_A, keep)
            assert torch.allclose(proj(Q), (P @ Q.flatten()).reshape(keep.shape), atol=1e-10), (name, form)
    # The grouping pays off on a staircase: fewer rotated entries than the full d_out × d_in.
    proj = KroneckerProjector(e.U_S, e.U_A, masks["staircase"], dtype=torch.float64)
    covered = sum((b - a) * (hi - lo) for a, b, lo, hi in proj.groups)
    assert int(masks["staircase"].sum()) <= covered < masks["staircase"].numel()


def test_nscl_masked_rotations():
    g = torch.Generator().manual_seed(12)
    U_A, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=g))
    keep = torch.tensor([False, True, False, True, True, False, True, True, True])
    proj = InputNullspaceProjector(U_A, keep, dtype=torch.float64)
    Q = torch.randn(4, 9, dtype=torch.float64, generator=g)
    M = keep.double()[None, :]
    assert torch.allclose(proj.rotate_masked(Q), (Q @ U_A) * M, atol=1e-12)
    assert torch.allclose(proj.unrotate_masked(Q), (Q * M) @ U_A.T, atol=1e-12)
    assert torch.allclose(proj.unrotate_masked(proj.rotate_masked(Q)), proj(Q), atol=1e-12)


def test_projected_quadratic_form_bounded_by_kept_energy():
    g = torch.Generator().manual_seed(1)
    A, S = random_psd(8, gen=g), random_psd(6, gen=g)
    e = eigendecompose(layer_from_factors(A, S))
    keep = build_masks({"l": e}, 0.95)["l"]
    K = torch.kron(S, A)  # row-major vec(W) block
    P = explicit_projector(e.U_S, e.U_A, keep)
    prods = torch.outer(e.lam_S, e.lam_A)
    kept_energy = float(prods[keep].sum())
    # Trace of the curvature restricted to the kept subspace is exactly the kept tail energy.
    assert math.isclose(float(torch.trace(P @ K @ P)), kept_energy, rel_tol=1e-9)
    assert kept_energy <= 0.05 * float(prods.sum()) + 1e-12
    proj = KroneckerProjector(e.U_S, e.U_A, keep, dtype=torch.float64)
    max_kept = float(prods[keep].max())
    for _ in range(20):
        X = proj(torch.randn(6, 8, dtype=torch.float64, generator=g))
        x = X.flatten()
        q = float(x @ K @ x)
        assert q <= max_kept * float(x @ x) * (1 + 1e-9)
        assert q <= kept_energy * float(x @ x) * (1 + 1e-9)


def test_energy_threshold_definition_and_bisection_agree():
    g = torch.Generator().manual_seed(2)
    eigs = {f"l{i}": eigendecompose(layer_from_factors(random_psd(30, 0.8, g), random_psd(20, 0.85, g) * (i + 1)))
            for i in range(3)}
    for gamma in (0.5, 0.9, 0.99, 0.99999):
        for scope_eigs in ([eigs["l0"]], list(eigs.values())):
            c_exact = energy_cutoff(scope_eigs, gamma, exact=True)
            c_bis = energy_cutoff(scope_eigs, gamma, exact=False)
            prods = torch.cat([torch.outer(e.lam_S, e.lam_A).flatten() for e in scope_eigs])
            removed = prods >= c_exact
            # The removed products are the top ones and hold at least γ of the energy; minimal such set.
            assert float(prods[removed].sum()) >= gamma * float(prods.sum()) * (1 - 1e-12)
            smallest_removed = prods[removed].min()
            assert float(prods[removed].sum() - smallest_removed) < gamma * float(prods.sum())
            assert torch.equal(prods >= c_bis, removed)
    # Global vs per-layer: both reported; global removes more from the layer with larger curvature.
    per = build_masks(eigs, 0.9, "layer")
    glob = build_masks(eigs, 0.9, "global")
    assert per.keys() == glob.keys()
    kf = {k: mask_report(eigs[k], glob[k])["kept_fraction"] for k in eigs}
    assert kf["l2"] <= kf["l0"]


def test_kept_fraction_monotone_in_gamma():
    g = torch.Generator().manual_seed(3)
    e = eigendecompose(layer_from_factors(random_psd(16, gen=g), random_psd(12, gen=g)))
    fr = [float(build_masks({"l": e}, gm)["l"].double().mean()) for gm in (0.1, 0.5, 0.9, 0.99, 0.9999)]
    assert all(a >= b for a, b in zip(fr, fr[1:])) and fr[0] > fr[-1]


def test_negative_eigenvalues_clamped_and_counted():
    M = torch.diag(torch.tensor([3.0, 1.0, -1e-9], dtype=torch.float64))
    lam, U, neg = sym_eigh(M)
    assert neg == 1 and float(lam.min()) == 0.0 and torch.all(lam[:-1] >= lam[1:])


def test_sink_directions_always_removed_and_projector_exact():
    g = torch.Generator().manual_seed(4)
    d_in, d_out = 9, 5
    A = random_psd(d_in, gen=g)
    v = torch.zeros(d_in, dtype=torch.float64)
    v[2] = 1.0
    st = LayerStats(A=A * 10, S=random_psd(d_out, gen=g) * 10, n=10, A_sink=torch.outer(v, v) * 3000.0**2, n_sink=1)
    e = eigendecompose(st, sink_energy=0.99)
    assert e.n_sink == 1 and torch.allclose(e.U_A.T @ e.U_A, torch.eye(d_in, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(e.U_A[:, 0].abs(), v)
    keep = build_masks({"l": e}, 0.5)["l"]
    assert not keep[:, 0].any()
    proj = KroneckerProjector(e.U_S, e.U_A, keep, dtype=torch.float64)
    P = explicit_projector(e.U_S, e.U_A, keep)
    Q = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    X = proj(Q)
    assert torch.allclose(X, (P @ Q.flatten()).reshape(d_out, d_in), atol=1e-10)
    assert torch.allclose(X @ v, torch.zeros(d_out, dtype=torch.float64), atol=1e-10)  # sink input untouched


def test_input_nullspace_projector():
    g = torch.Generator().manual_seed(5)
    lam, U, _ = sym_eigh(random_psd(10, gen=g))
    keep_cols = torch.arange(10) >= 4
    p = InputNullspaceProjector(U, keep_cols, dtype=torch.float64)
    Q = torch.randn(3, 10, dtype=torch.float64, generator=g)
    X = p(Q)
    assert torch.allclose(X @ U[:, :4], torch.zeros(3, 4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p(X), X, atol=1e-10)


# ---------------------------------------------------------------- K-FAC vs Gauss-Newton from Jacobians

class TinyMLP(nn.Module):
    def __init__(self, d=4, h=5, c=3):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def ggn_block_from_jacobian(model, x, name):
    """Exact GGN block Jᵀ H J of the cross-entropy for one datum, row-major vec(W)."""
    mod = model.get_submodule(name)
    W0 = mod.weight.detach().clone()

    def f(w):
        with torch.nn.utils.stateless._reparametrize_module(model, {f"{name}.weight": w}):
            return model(x)[0]

    J = torch.autograd.functional.jacobian(f, W0).reshape(-1, W0.numel())  # (C, d_out*d_in)
    p = torch.softmax(model(x)[0].detach(), -1)
    H = torch.diag(p) - torch.outer(p, p)
    return J.T @ H @ J


def kfac_for(model, x, targets, labels, mc=1, seed=0):
    mods = {n: model.get_submodule(n) for n in ("fc1", "fc2")}
    stats = empty_stats(mods)
    gen = torch.Generator().manual_seed(seed)
    accumulate_batch(stats, mods, lambda: model(x), targets, torch.ones(x.shape[0], dtype=torch.bool),
                     CollectConfig(labels=labels, mc_samples=mc), gen)
    return stats


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_single_datum_exact_kfac_equals_gauss_newton(name):
    torch.manual_seed(0)
    model = TinyMLP().double()
    x = torch.randn(1, 4, dtype=torch.float64)
    stats = kfac_for(model, x, torch.tensor([1]), "exact")
    A, S = stats[name].factors()
    G = ggn_block_from_jacobian(model, x, name)
    assert torch.allclose(torch.kron(S, A), G, atol=1e-12, rtol=1e-10)


SAMPLED_TOLERANCE = 0.06  # relative Frobenius error of S at 4000 label samples (≈ 2/√4000 with margin)


def test_sampled_labels_converge_to_gauss_newton():
    torch.manual_seed(0)
    model = TinyMLP().double()
    x = torch.randn(1, 4, dtype=torch.float64)
    exact = kfac_for(model, x, torch.tensor([1]), "exact")["fc1"].factors()[1]
    errs = []
    for m in (50, 4000):
        S = kfac_for(model, x, torch.tensor([1]), "sampled", mc=m, seed=1)["fc1"].factors()[1]
        errs.append(float(torch.linalg.norm(S - exact) / torch.linalg.norm(exact)))
    assert errs[1] < SAMPLED_TOLERANCE
    assert errs[1] < errs[0]
    # Empirical Fisher (data labels) is a different matrix: it does not converge to the GGN.
    emp = kfac_for(model, x, torch.tensor([1]), "empirical")["fc1"].factors()[1]
    assert float(torch.linalg.norm(emp - exact) / torch.linalg.norm(exact)) > 0.1


# ---------------------------------------------------------------- tiny causal LM

def tiny_llama(seed=0, vocab=11, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]


class _Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids).logits.transpose(1, 2)  # (B, C, T) as CrossEntropyLoss expects


# curvlinops' type-2 backpropagates each Hessian-square-root column through all positions at once, which adds
# cross-position products for sequences; ours keeps positions apart (= the limit of sampled labels). The two
# coincide when every sequence has one position, so type-2 is compared there and empirical on sequences.
@pytest.mark.parametrize("labels,fisher,T", [("exact", "type-2", 1), ("empirical", "empirical", 6)])
def test_matches_curvlinops_kfac_on_multi_datum_sequences(labels, fisher, T):
    curvlinops = pytest.importorskip("curvlinops")
    model = tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(0, 11, (5, T))
    y = torch.randint(0, 11, (5, T))
    wrap = _Wrap(model)
    params = [model.get_submodule(t).weight for t in TARGETS]
    op = curvlinops.KFACLinearOperator(wrap, nn.CrossEntropyLoss(), params, [(ids, y)], fisher_type=fisher,
                                       kfac_approx="expand", check_deterministic=False)
    op.compute_kronecker_factors()
    mods = {t: model.get_submodule(t) for t in TARGETS}
    stats = empty_stats(mods)
    accumulate_batch(stats, mods, lambda: model(input_ids=ids).logits, y, torch.ones_like(ids, dtype=torch.bool),
                     CollectConfig(labels=labels))
    for t in TARGETS:
        A, S = stats[t].factors()
        assert torch.allclose(A, op._input_covariances[f"m.{t}"], rtol=1e-9, atol=1e-12), t
        # HF's LlamaRMSNorm computes in float32 even in a float64 model, and curvlinops scales the loss by 1/N
        # before the backward while we do not, so the two round differently: ~5e-8 relative error measured.
        Sc = op._gradient_covariances[f"m.{t}"]
        assert float(torch.linalg.norm(S - Sc) / torch.linalg.norm(Sc)) < 1e-6, t


def _random_sequences(n=7, seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _assert_stats_close(a: KFACStats, b: KFACStats):
    for k in a:
        assert a[k].n == b[k].n
        assert torch.allclose(a[k].A, b[k].A, rtol=1e-10, atol=1e-12)
        assert torch.allclose(a[k].S, b[k].S, rtol=1e-9, atol=1e-14)


def test_padding_batch_size_and_sharding_do_not_change_factors():
    model = tiny_llama()
    seqs = _random_sequences()
    cfg = CollectConfig(labels="empirical", sink_tokens=0)
    one = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=1, progress=False)
    padded = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=4, pad_id=0, progress=False)
    _assert_stats_close(one, padded)
    other_pad = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=7, pad_id=5, progress=False)
    _assert_stats_close(one, other_pad)
    sharded = collect_lm_stats(model, seqs[0::2], TARGETS, cfg, batch_size=3, progress=False)
    sharded.add_(collect_lm_stats(model, seqs[1::2], TARGETS, cfg, batch_size=2, progress=False))
    _assert_stats_close(one, sharded)
    assert one[TARGETS[0]].n == sum(len(s) for s in seqs)


def test_sink_positions_are_kept_apart():
    model = tiny_llama()
    seqs = _random_sequences()
    full = collect_lm_stats(model, seqs, TARGETS, CollectConfig(labels="empirical", sink_tokens=0), batch_size=3,
                            progress=False)
    sink = collect_lm_stats(model, seqs, TARGETS, CollectConfig(labels="empirical", sink_tokens=1), batch_size=3,
                            progress=False)
    t = TARGETS[0]
    assert sink[t].n_sink == len(seqs) and sink[t].n + sink[t].n_sink == full[t].n
    assert torch.allclose(sink[t].A + sink[t].A_sink, full[t].A, rtol=1e-10, atol=1e-12)


def test_collection_leaves_grads_flags_and_outputs_untouched():
    model = tiny_llama()
    seqs = _random_sequences()
    ids = torch.tensor([seqs[0]])
    before = model(input_ids=ids).logits.detach().clone()
    sentinel = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        if i % 2 == 0:
            p.grad = torch.full_like(p, 0.5)
            sentinel[n] = p.grad.clone()
        if i % 3 == 0:
            p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    collect_lm_stats(model, seqs, TARGETS, CollectConfig(labels="sampled", sink_tokens=0), batch_size=3,
                     progress=False)
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        if n in sentinel:
            assert torch.equal(p.grad, sentinel[n])
        else:
            assert p.grad is None
    assert torch.equal(model(input_ids=ids).logits.detach(), before)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_sampled_converges_to_exact_on_sequences():
    """On sequences (attention mixes positions) exact = E over independently sampled labels."""
    model = tiny_llama()
    torch.manual_seed(2)
    ids = torch.randint(0, 11, (2, 5))
    y = torch.randint(0, 11, (2, 5))
    mods = {t: model.get_submodule(t) for t in TARGETS[:1]}
    ones = torch.ones_like(ids, dtype=torch.bool)
    ex = empty_stats(mods)
    accumulate_batch(ex, mods, lambda: model(input_ids=ids).logits, y, ones, CollectConfig(labels="exact"))
    sa = empty_stats(mods)
    accumulate_batch(sa, mods, lambda: model(input_ids=ids).logits, y, ones,
                     CollectConfig(labels="sampled", mc_samples=3000), torch.Generator().manual_seed(0))
    Se, Ss = ex[TARGETS[0]].S, sa[TARGETS[0]].S
    assert float(torch.linalg.norm(Ss - Se) / torch.linalg.norm(Se)) < SAMPLED_TOLERANCE
