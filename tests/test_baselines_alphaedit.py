"""AlphaEdit on a tiny float64 Llama: the update lives in the null space of the preserved keys (ΔW·K₀ ≈ 0 in the
projected sense), solves its normal equations, and the sequential variant accumulates the edited keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baselines_tiny import REQUESTS, TARGETS, tiny_curvature, tiny_model, weights

import crispedit.baselines.alphaedit as alpha_mod
from crispedit.baselines import AlphaEditConfig, MemitConfig, run_baseline
from crispedit.baselines.alphaedit import alphaedit_solve, null_space_projector
from crispedit.baselines.keys import subject_keys
from crispedit.baselines.memit import key_covariance
from crispedit.models.targets import weight_matrix

FAST = dict(v_steps=8, context_prefixes=2, context_length=4, v_lr=0.5)


@pytest.fixture
def tiny(byte_bpe_tokenizer):
    model = tiny_model(byte_bpe_tokenizer)
    return model, byte_bpe_tokenizer, tiny_curvature(model, byte_bpe_tokenizer)


def _spd(d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n, generator=g, dtype=torch.float64) * torch.logspace(0, -4, d, dtype=torch.float64)[:, None]
    return X @ X.T / n


def test_null_space_projector_is_the_orthogonal_projector_onto_small_eigenvalues():
    C = _spd(10, 30, 0)
    lam, U = torch.linalg.eigh(C)
    thr = float(lam[4] + lam[5]) / 2  # five eigenvalues below
    P, dim = null_space_projector(C, thr)
    assert dim == 5
    assert torch.allclose(P, P.T, atol=1e-14) and torch.allclose(P @ P, P, atol=1e-12)
    assert float((P @ U[:, 5:]).norm()) < 1e-12  # kept (large-eigenvalue) directions are annihilated
    assert torch.allclose(P @ U[:, :5], U[:, :5], atol=1e-12)


def test_alphaedit_solve_stays_in_the_null_space_and_solves_its_normal_equations():
    g = torch.Generator().manual_seed(3)
    d_in, d_out, n, alpha = 10, 6, 4, 0.5
    C = _spd(d_in, 40, 1)
    P, dim = null_space_projector(C, 1e-5)
    assert 0 < dim < d_in
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    Kp = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    dW = alphaedit_solve(K, R, P, Kp @ Kp.T, alpha)
    eye = torch.eye(d_in, dtype=torch.float64)
    assert float((dW @ (eye - P)).norm() / dW.norm()) < 1e-12
    lhs = dW @ ((K @ K.T + Kp @ Kp.T) @ P + alpha * eye)
    rhs = R @ K.T @ P
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-10
    # oracle: the same objective written in a basis U₀ of the null space, ΔW = Y U₀ᵀ
    lam, U = torch.linalg.eigh(C)
    U0 = U[:, lam < 1e-5]
    G = U0.T @ (K @ K.T + Kp @ Kp.T) @ U0 + alpha * torch.eye(U0.shape[1], dtype=torch.float64)
    Y = torch.linalg.solve(G, U0.T @ K @ R.T).T
    assert float((dW - Y @ U0.T).norm() / dW.norm()) < 1e-10


def test_alphaedit_run_annihilates_the_preserved_keys(tiny, byte_bpe_tokenizer):
    model, tok, cur = tiny
    base = weights(model)
    # a threshold that leaves a null space of a good size in every layer
    thr = min(float(torch.linalg.eigvalsh(key_covariance(cur, n, "all_tokens")).quantile(0.4)) for n in TARGETS)
    delta = run_baseline("alphaedit", model, tok, REQUESTS, cur, AlphaEditConfig(null_threshold=thr, l2=0.1, **FAST))
    for n in TARGETS:
        C = key_covariance(cur, n, "all_tokens")
        lam, U = torch.linalg.eigh(C)
        keep = U[:, lam >= thr]
        assert 0 < keep.shape[1] < C.shape[0]
        assert delta.record["null_space_dim"][n] == C.shape[0] - keep.shape[1]
        dW = delta.deltas[n].double()
        assert float(dW.norm()) > 0
        # the update does not touch the kept directions (float32 delta: relative 1e-6)
        assert float((dW @ keep).norm() / dW.norm()) < 1e-5
        # hence on the preserved keys themselves E‖ΔW k‖² = tr(ΔW C ΔWᵀ) ≤ threshold · ‖ΔW‖²
        assert float(torch.trace(dW @ C @ dW.T)) <= thr * float(dW.norm() ** 2) * (1 + 1e-4)
    # MEMIT on the same requests writes into the kept directions
    other = tiny_model(byte_bpe_tokenizer)
    memit = run_baseline("memit", other, tok, REQUESTS, cur, MemitConfig(mom2_weight=2.0, **FAST))
    dW = memit.deltas[TARGETS[0]].double()
    lam, U = torch.linalg.eigh(key_covariance(cur, TARGETS[0], "all_tokens"))
    assert float((dW @ U[:, lam >= thr]).norm() / dW.norm()) > 0.1
    delta.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)


def test_sequential_alphaedit_accumulates_the_edited_keys(tiny, monkeypatch):
    model, tok, cur = tiny
    calls = []
    real = alpha_mod.alphaedit_solve

    def recording(K, R, P, C_p, l2):
        calls.append((K.clone(), C_p.clone(), {n: w.clone() for n, w in weights(model).items()}))
        return real(K, R, P, C_p, l2)

    monkeypatch.setattr(alpha_mod, "alphaedit_solve", recording)
    thr = min(float(torch.linalg.eigvalsh(key_covariance(cur, n, "all_tokens")).quantile(0.4)) for n in TARGETS)
    cfg = AlphaEditConfig(null_threshold=thr, l2=0.1, chunk_size=2, **dict(FAST, context_prefixes=0))
    delta = run_baseline("alphaedit", model, tok, REQUESTS, cur, cfg)
    assert len(calls) == 2 * len(TARGETS)
    for j in range(len(TARGETS)):
        assert float(calls[j][1].norm()) == 0.0  # first chunk: nothing edited before
    # second chunk, layer j: C_p = K₁K₁ᵀ with K₁ = first chunk's keys read on the model after the first chunk
    after_first = calls[len(TARGETS)][2]
    edited = weights(model)
    with torch.no_grad():
        for n in TARGETS:
            weight_matrix(model.get_submodule(n)).copy_(after_first[n])
    for j, n in enumerate(TARGETS):
        K1 = subject_keys(model, tok, REQUESTS[:2], [n], [])[n].T
        C_p = calls[len(TARGETS) + j][1]
        assert float((C_p - K1 @ K1.T).norm() / (K1 @ K1.T).norm()) < 1e-10
    with torch.no_grad():
        for n in TARGETS:
            weight_matrix(model.get_submodule(n)).copy_(edited[n])
    assert [c["n"] for c in delta.record["chunks"]] == [2, 2]


def test_alphaedit_config_rejects_bad_values():
    with pytest.raises(ValueError, match="null_threshold"):
        AlphaEditConfig(null_threshold=0)
    with pytest.raises(ValueError, match="covariance"):
        dataclasses.replace(AlphaEditConfig(), covariance="sink")
