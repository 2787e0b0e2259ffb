"""UltraEdit on a tiny float64 Llama: the closed form equals a direct least-squares solve, the captured factors
are the true gradient's, the lifelong statistics equal those of all rows at once, chunks compose."""

from __future__ import annotations

import pytest
import torch
from baselines_tiny import REQUESTS, TARGETS, captured_inputs_and_output_grads, tiny_model, weights

from crispedit.baselines import UltraEditConfig, run_baseline
from crispedit.baselines.ultraedit import RunningMoments, keys_and_output_grads, ultraedit_solve, ultraedit_values
from crispedit.baselines.common import next_token_targets
from crispedit.formatting import PromptFormat, collate, encode_pair
from crispedit.models.targets import weight_matrix


def test_running_moments_equal_the_statistics_of_all_rows():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(m, 5, generator=g, dtype=torch.float64) * 3 + 1 for m in (1, 7, 2, 11)]
    rm = RunningMoments(5)
    for x in rows:
        rm.update(x)
    allx = torch.cat(rows)
    assert rm.n == allx.shape[0]
    assert torch.allclose(rm.mean, allx.mean(0), atol=1e-12)
    assert torch.allclose(rm.std, allx.std(0), atol=1e-12)  # sample std (n − 1)
    z = rm.normalize(allx)
    assert torch.allclose(z.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10)


def test_ultraedit_closed_form_matches_a_direct_least_squares_solve():
    g = torch.Generator().manual_seed(1)
    m, d_in, d_out, rho = 9, 6, 4, 0.7
    K = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    V = torch.randn(m, d_out, generator=g, dtype=torch.float64)
    dW = ultraedit_solve(K, V, rho)
    # min ‖K ΔWᵀ − V‖² + ρ‖ΔW‖² as a stacked least-squares problem
    A = torch.cat([K, rho ** 0.5 * torch.eye(d_in, dtype=torch.float64)])
    B = torch.cat([V, torch.zeros(d_in, d_out, dtype=torch.float64)])
    oracle = torch.linalg.lstsq(A, B).solution.T
    assert dW.shape == (d_out, d_in)
    assert float((dW - oracle).norm() / oracle.norm()) < 1e-10


def test_pseudo_values_are_minus_lr_times_the_normalised_key_norm_times_the_normalised_gradient():
    g = torch.Generator().manual_seed(2)
    K = torch.randn(8, 3, generator=g, dtype=torch.float64)
    G = torch.randn(8, 2, generator=g, dtype=torch.float64) * 1e-3
    rm = RunningMoments(5)
    rm.update(torch.cat([K, G], 1))
    V = ultraedit_values(K, G, rm, lr=0.25)
    k_hat = (K - K.mean(0)) / (K.std(0) + 1.1920928955078125e-07)
    g_hat = (G - G.mean(0)) / (G.std(0) + 1.1920928955078125e-07)
    assert torch.allclose(V, -0.25 * (k_hat ** 2).sum(1, keepdim=True) * g_hat, atol=1e-12)


def test_captured_keys_and_gradients_are_the_weight_gradient(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    model = tiny_model(tok)
    batches = keys_and_output_grads(model, tok, REQUESTS, TARGETS, batch_size=4)
    assert len(batches) == 1
    # oracle: autograd of the same loss with respect to the weights
    pairs = [encode_pair(tok, r.prompt, r.target, PromptFormat("raw"), add_eos=False) for r in REQUESTS]
    b = collate([p.input_ids for p in pairs], 1, labels=[p.labels for p in pairs])
    tgt = next_token_targets(b["labels"])
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[tgt != -100], tgt[tgt != -100])
    grads = torch.autograd.grad(loss, [model.get_submodule(n).weight for n in TARGETS])
    # independent capture of every position's input and output gradient (retain_grad)
    ins, douts = captured_inputs_and_output_grads(
        model, lambda lg: torch.nn.functional.cross_entropy(lg[tgt != -100], tgt[tgt != -100]),
        b["input_ids"], b["attention_mask"])
    mask = tgt != -100
    for n, gW in zip(TARGETS, grads):
        full = torch.einsum("bto,bti->oi", douts[n], ins[n])
        assert float((full - gW).norm() / gW.norm()) < 1e-10
        K, G = batches[0][n]
        # the captured rows are exactly the target-predicting positions' inputs and output gradients
        assert K.shape[0] == int(mask.sum())
        assert torch.equal(K, ins[n][mask].double())
        ref = douts[n][mask]
        assert float((G - ref).norm() / ref.norm()) < 1e-12


def test_ultraedit_run_equals_the_closed_form_on_its_own_statistics_and_chunks_compose(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    model = tiny_model(tok)
    base = weights(model)
    cfg = UltraEditConfig(lr=1e-3, ridge=0.5, chunk_size=None, batch_size=2)
    batches = keys_and_output_grads(model, tok, REQUESTS, TARGETS, batch_size=2)
    delta = run_baseline("ultraedit", model, tok, REQUESTS, None, cfg, targets=TARGETS)
    rm = RunningMoments(64 + 32)  # both targets have shape (32, 64): one shared normaliser
    for n in TARGETS:
        for b in batches:
            rm.update(torch.cat(b[n], 1))
    for n in TARGETS:
        K = torch.cat([b[n][0] for b in batches])
        G = torch.cat([b[n][1] for b in batches])
        expect = ultraedit_solve(K, ultraedit_values(K, G, rm, 1e-3), 0.5)
        assert float((delta.deltas[n].double() - expect).norm() / expect.norm()) < 1e-5
    delta.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)

    # two chunks: the second is solved on the edited model with statistics of both chunks
    seq = run_baseline("ultraedit", model, tok, REQUESTS, None,
                       UltraEditConfig(lr=1e-3, ridge=0.5, chunk_size=2, batch_size=2), targets=TARGETS)
    assert [c["n"] for c in seq.record["chunks"]] == [2, 2]
    seq.revert(model)
    first = keys_and_output_grads(model, tok, REQUESTS[:2], TARGETS, batch_size=2)
    rm = RunningMoments(96)
    for n in TARGETS:
        for b in first:
            rm.update(torch.cat(b[n], 1))
    d1 = {n: ultraedit_solve(first[0][n][0], ultraedit_values(*first[0][n], rm, 1e-3), 0.5) for n in TARGETS}
    with torch.no_grad():
        for n in TARGETS:
            weight_matrix(model.get_submodule(n)).copy_(base[n] + d1[n])
    second = keys_and_output_grads(model, tok, REQUESTS[2:], TARGETS, batch_size=2)
    for n in TARGETS:
        for b in second:
            rm.update(torch.cat(b[n], 1))
    for n in TARGETS:
        d2 = ultraedit_solve(second[0][n][0], ultraedit_values(*second[0][n], rm, 1e-3), 0.5)
        both = d1[n] + d2
        assert float((seq.deltas[n].double() - both).norm() / both.norm()) < 1e-4


def test_ultraedit_config_rejects_bad_values():
    with pytest.raises(ValueError, match="UltraEditConfig.lr"):
        UltraEditConfig(lr=0)
    with pytest.raises(ValueError, match="chunk_size"):
        UltraEditConfig(chunk_size=0)


def test_default_layers_are_the_reference_depths_scaled_to_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from crispedit.baselines.ultraedit import default_ultraedit_targets

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=30, num_attention_heads=2,
                      num_key_value_heads=1)
    names = default_ultraedit_targets(LlamaForCausalLM(cfg))
    assert names == [f"model.layers.{i}.mlp.gate_proj" for i in range(10, 15)] + \
        [f"model.layers.{i}.mlp.up_proj" for i in range(17, 23)]
