"""Curvature at scale (issue 12, item 7): output gradients formed a chunk of positions at a time equal the
whole-batch cross-entropy path, and no probability tensor larger than a chunk is built."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crispedit.curvature import collect as collect_mod
from crispedit.curvature.collect import (
    Capture,
    CollectConfig,
    _uniforms,
    collect_lm_stats,
    frozen_parameters,
    sequence_generators,
)

VOCAB = 37
TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double().eval()


def sequences(n: int = 6, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def reference_stats(model, seqs, labels: str, seed: int = 0, positions=None):
    """The whole-batch path: one float cross-entropy over every loss position of each sequence (batch size
    1), labels drawn with the same per-sequence uniforms by the inverse CDF of a full softmax. A and S summed at
    `positions[i]` of sequence i (None: all; out-of-range ones ignored); returns (A, S, positions counted)."""
    mods = {n: model.get_submodule(n) for n in TARGETS}
    A = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    S = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in mods.items()}
    count = 0
    with frozen_parameters(model):
        for i, s in enumerate(seqs):
            keep = list(range(len(s))) if positions is None or positions[i] is None else [
                p for p in positions[i] if p < len(s)]
            count += len(keep)
            ids = torch.tensor([s])
            with Capture(mods) as cap:
                logits = model(input_ids=ids).logits[0, :-1]
                if labels == "sampled":
                    u = _uniforms(torch.ones(1, len(s) - 1, dtype=torch.bool), None, sequence_generators(seed, [i]))
                    cdf = torch.softmax(logits.detach(), -1).cumsum(-1)
                    y = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
                else:
                    y = ids[0, 1:]
                loss = nn.functional.cross_entropy(logits, y, reduction="sum")
                gs = torch.autograd.grad(loss, [cap.outputs[n] for n in mods])
                for n, g in zip(mods, gs):
                    a, g = cap.inputs[n][0][keep], g[0][keep]
                    A[n] += a.T @ a
                    S[n] += g.T @ g
    return A, S, count


def reference_S(model, seqs, labels: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return reference_stats(model, seqs, labels, seed)[1]


@pytest.mark.parametrize("labels", ["sampled", "empirical"])
def test_chunked_output_gradients_equal_the_whole_batch_cross_entropy(labels, monkeypatch):
    torch.set_num_threads(1)
    model, seqs = tiny_llama(), sequences()
    ref = reference_S(model, seqs, labels)
    cfg = CollectConfig(labels=labels, sink_tokens=0)
    for chunk in (1, 3 * VOCAB, 10**9):  # one position at a time, three, everything at once
        monkeypatch.setattr(collect_mod, "SOFTMAX_CHUNK", chunk)
        got = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=4, progress=False)
        for n in TARGETS:
            err = float((got[n].S - ref[n]).norm() / ref[n].norm())
            assert err < 1e-12, (labels, chunk, n, err)


def test_no_probability_tensor_larger_than_a_chunk(monkeypatch):
    model, seqs = tiny_llama(), sequences(n=4)
    sizes = []
    real = torch.softmax

    def spy(x, dim=None, **kw):
        if x.shape[-1] == VOCAB:
            sizes.append(x.numel())
        return real(x, dim=dim, **kw)

    monkeypatch.setattr(torch, "softmax", spy)
    monkeypatch.setattr(collect_mod, "SOFTMAX_CHUNK", 2 * VOCAB)
    collect_lm_stats(model, seqs, TARGETS, CollectConfig(labels="sampled", mc_samples=2, sink_tokens=0), batch_size=4,
                     progress=False)
    assert sizes and max(sizes) <= 2 * VOCAB


@pytest.mark.parametrize("labels", ["sampled", "empirical"])
def test_counted_positions_sum_only_there_with_the_whole_sequence_loss(labels):
    """`positions`: A and S sum a aᵀ and g gᵀ only at the listed positions of each sequence, g being the gradient
    of the *whole* sequence's loss (same label stream as an unrestricted collection); None keeps a sequence whole,
    out-of-range positions are ignored, and the restricted and complementary collections add up to the whole."""
    model, seqs = tiny_llama(), sequences(n=5)
    cfg = CollectConfig(labels=labels, sink_tokens=0)
    positions = [[len(seqs[0]) - 1, 1], None, [2, 999], [0], [3, 1]]
    got = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=2, progress=False, positions=positions)
    A, S, count = reference_stats(model, seqs, labels, positions=positions)
    for n in TARGETS:
        assert got[n].n == count
        for mine, ref in ((got[n].A, A[n]), (got[n].S, S[n])):
            assert float((mine - ref).norm() / ref.norm()) < 1e-12, n
    whole = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=3, progress=False)
    rest = [[p for p in range(len(s)) if p not in (range(len(s)) if k is None else k)] for s, k in zip(seqs, positions)]
    other = collect_lm_stats(model, seqs, TARGETS, cfg, batch_size=3, progress=False, positions=rest)
    for n in TARGETS:
        assert float((got[n].A + other[n].A - whole[n].A).norm() / whole[n].A.norm()) < 1e-12
        assert float((got[n].S + other[n].S - whole[n].S).norm() / whole[n].S.norm()) < 1e-12
    with pytest.raises(ValueError, match="position lists"):
        collect_lm_stats(model, seqs, TARGETS, cfg, positions=positions[:2])
