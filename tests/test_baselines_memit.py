"""MEMIT on a tiny float64 Llama: the update solves its normal equations with the keys and residuals of the run,
layer by layer on the partially edited model; batching, sequential chunks and the delta's bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baselines_tiny import REQUESTS, TARGETS, tiny_curvature, tiny_model, weights

import crispedit.baselines.memit as memit_mod
from crispedit.baselines import MemitConfig, run_baseline, validate
from crispedit.baselines.keys import block_of, subject_keys, subject_outputs
from crispedit.baselines.memit import key_covariance, memit_solve
from crispedit.baselines.values import ValueSettings, optimize_values
from crispedit.models.targets import weight_matrix

FAST = dict(v_steps=8, context_prefixes=2, context_length=4, v_lr=0.5)


@pytest.fixture
def tiny(byte_bpe_tokenizer):
    model = tiny_model(byte_bpe_tokenizer)
    return model, byte_bpe_tokenizer, tiny_curvature(model, byte_bpe_tokenizer)


def test_memit_solve_is_the_regularised_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, lam = 12, 7, 5, 3.0
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    X = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    C = X @ X.T / 40
    dW = memit_solve(K, R, C, lam)
    # normal equations ΔW (λC + KKᵀ) = R Kᵀ
    lhs, rhs = dW @ (lam * C + K @ K.T), R @ K.T
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-12
    # oracle: min ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) as one stacked least-squares problem, C = L Lᵀ
    L = torch.linalg.cholesky(C)
    A = torch.cat([K.T, lam ** 0.5 * L.T])
    B = torch.cat([R.T, torch.zeros(d_in, d_out, dtype=torch.float64)])
    oracle = torch.linalg.lstsq(A, B).solution.T
    assert float((dW - oracle).norm() / oracle.norm()) < 1e-10


def test_memit_run_solves_the_normal_equations_layer_by_layer(tiny, monkeypatch):
    model, tok, cur = tiny
    base = weights(model)
    calls = []
    real = memit_mod.memit_solve

    def recording(K, R, C, lam):
        dW = real(K, R, C, lam)
        calls.append((K.clone(), R.clone(), C.clone(), lam, dW.clone()))
        return dW

    monkeypatch.setattr(memit_mod, "memit_solve", recording)
    cfg = MemitConfig(mom2_weight=2.0, **FAST)
    delta = run_baseline("memit", model, tok, REQUESTS, cur, cfg)
    assert len(calls) == len(TARGETS)
    prefixes = delta.record["context_prefixes"]
    assert len(prefixes) == 2
    z_block = block_of(TARGETS[-1])
    edited = weights(model)
    zs = []
    for j, (name, (K, R, C, lam, dW)) in enumerate(zip(TARGETS, calls)):
        # the key covariance is the cache's sink-inclusive A, scaled by λ
        assert torch.equal(C, key_covariance(cur, name, "all_tokens")) and lam == 2.0
        # ΔW (λC + KKᵀ) = R Kᵀ
        lhs, rhs = dW @ (lam * C + K @ K.T), R @ K.T
        assert float((lhs - rhs).norm() / rhs.norm()) < 1e-10
        # the delta holds exactly this layer's update (one chunk, one solve per layer)
        assert torch.allclose(delta.deltas[name].double(), dW, rtol=0, atol=1e-6 * float(dW.abs().max()))
        # keys and residuals were read on the model carrying the updates of the earlier layers only
        with torch.no_grad():
            for i, n in enumerate(TARGETS):
                weight_matrix(model.get_submodule(n)).copy_(edited[n] if i < j else base[n])
        K_ref = subject_keys(model, tok, REQUESTS, [name], prefixes)[name].T
        assert float((K - K_ref).norm() / K_ref.norm()) < 1e-10
        h = subject_outputs(model, tok, REQUESTS, z_block)
        zs.append(R.T * (len(TARGETS) - j) + h)  # z = R·(layers left) + h, the same target at every layer
    assert float((zs[0] - zs[1]).norm() / zs[0].norm()) < 1e-10
    with torch.no_grad():
        for n in TARGETS:
            weight_matrix(model.get_submodule(n)).copy_(edited[n])
    delta.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)
    rec = delta.record
    for key in ("base_weights_sha256", "requests_sha256", "n_requests", "config", "seconds", "timings",
                "diagnostics", "edited_weights_sha256"):
        assert key in rec, key
    assert rec["config"]["method"] == "memit" and rec["config"]["mom2_weight"] == 2.0
    assert all("kfac_quadratic_form" in rec["diagnostics"][n] for n in TARGETS)


def test_covariance_choice_reads_the_sink_inclusive_or_the_sink_free_factor(tiny):
    _, _, cur = tiny
    n = TARGETS[0]
    s = cur.stats[n]
    assert s.n_sink > 0
    assert torch.equal(key_covariance(cur, n, "all_tokens"), s.full_input_factor().double())
    assert torch.equal(key_covariance(cur, n, "without_sink"), (s.A / s.n).double())
    assert not torch.allclose(key_covariance(cur, n, "all_tokens"), key_covariance(cur, n, "without_sink"))


def test_values_optimised_together_equal_values_optimised_one_at_a_time(tiny):
    model, tok, _ = tiny
    block = block_of(TARGETS[-1])
    prefixes = ["Because of this. ", "I think. "]
    together = optimize_values(model, tok, REQUESTS, block, prefixes, ValueSettings(steps=6, group_size=4))
    alone = optimize_values(model, tok, REQUESTS, block, prefixes, ValueSettings(steps=6, group_size=1))
    assert float((together.z - alone.z).norm() / (alone.z - alone.init).norm()) < 1e-8
    assert together.steps == alone.steps
    # the optimisation lowered each request's target NLL (the loss it was given)
    first = optimize_values(model, tok, REQUESTS, block, prefixes, ValueSettings(steps=1))
    assert all(a < b for a, b in zip(together.final_nll, first.final_nll))


def test_value_norm_is_clamped(tiny):
    model, tok, _ = tiny
    v = optimize_values(model, tok, REQUESTS, block_of(TARGETS[-1]), [],
                        ValueSettings(steps=10, lr=50.0, weight_decay=0.0, clamp_norm_factor=0.1))
    ratio = (v.z - v.init).norm(dim=1) / v.init.norm(dim=1)
    assert torch.all(ratio <= 0.1 + 1e-6) and torch.all(ratio > 0.09)


def test_sequential_memit_is_chunk_after_chunk_on_the_edited_model(tiny, byte_bpe_tokenizer):
    model, tok, cur = tiny
    cfg = MemitConfig(mom2_weight=2.0, **dict(FAST, context_prefixes=0))
    seq = run_baseline("memit", model, tok, REQUESTS, cur, dataclasses.replace(cfg, chunk_size=2))
    assert [c["n"] for c in seq.record["chunks"]] == [2, 2]
    seq.revert(model)
    first = run_baseline("memit", model, tok, REQUESTS[:2], cur, cfg)
    second = run_baseline("memit", model, tok, REQUESTS[2:], cur, cfg)
    for n in TARGETS:
        both = first.deltas[n].double() + second.deltas[n].double()
        assert float((seq.deltas[n].double() - both).norm() / both.norm()) < 1e-5
    batch_model = tiny_model(byte_bpe_tokenizer)
    batch = run_baseline("memit", batch_model, tok, REQUESTS, cur, cfg)
    assert not torch.allclose(batch.deltas[TARGETS[0]], seq.deltas[TARGETS[0]], atol=1e-6)


def test_the_shortcut_through_the_later_blocks_equals_the_full_forward(tiny):
    from crispedit.baselines.values import _Forward

    model, tok, _ = tiny
    from crispedit.formatting import collate

    b = collate([tok("The capital of France is Rome")["input_ids"], tok("Reply: yes. Reply: no.")["input_ids"]], 1)
    ids, attn = b["input_ids"], b["attention_mask"]
    rows, lookup, owner = torch.tensor([0, 1]), torch.tensor([3, 2]), torch.tensor([0, 1])
    g_rows, g_pos = torch.tensor([0, 0, 1]), torch.tensor([4, 5, 6])
    fwd = _Forward(model, block_of(TARGETS[-1]), ids, attn, rows, lookup, owner, g_rows, g_pos)
    assert fwd.tail is not None  # a Llama exposes its decoder and block list
    delta = torch.randn(2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, zero = fwd(delta), fwd(torch.zeros_like(delta))
        fwd.tail = None
        slow = fwd(delta)
    assert float((fast - slow).abs().max()) < 1e-10 and float((fast - zero).abs().max()) > 1e-3


def test_memit_refuses_a_cache_with_fewer_tokens_than_key_dimensions(tiny, byte_bpe_tokenizer):
    from crispedit.errors import CrispEditError

    model, tok, _ = tiny
    small = tiny_curvature(model, tok, n_random=0, n_texts=3)  # about 40 tokens for 64 inputs
    assert small.stats[TARGETS[0]].n + small.stats[TARGETS[0]].n_sink < 64
    with pytest.raises(CrispEditError, match="fewer than its 64 inputs"):
        run_baseline("memit", model, tok, REQUESTS, small, MemitConfig(**FAST))
    # the cache's record alone tells: the CLI can refuse before loading the model
    record = dict(small.record, counts={n: {"n": s.n, "n_sink": s.n_sink} for n, s in small.stats.items()})
    with pytest.raises(CrispEditError, match="fewer than its 64 inputs"):
        validate("memit", REQUESTS, curvature=record)
