"""Perplexity and KL(p_base || p_edited) against exact oracles."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from crispedit.evaluation.capability import capability_metrics, kl_divergence, perplexity

V = 11


class BigramLM(nn.Module):
    """logits[t] = table[token_t]: next-token distributions known in closed form."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return type("Out", (), {"logits": self.table[input_ids]})()


SEQS = [[1, 2, 3, 4, 5, 6, 7], [3, 3, 9], [10, 0, 5, 5, 2], [4, 8], [7, 1, 1, 1, 2, 9, 6, 0, 3]]


def _table(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * 2


def _hand_logp(table, a, b):
    """log softmax(table[a])[b] in plain Python floats."""
    row = [float(x) for x in table[a]]
    m = max(row)
    return row[b] - m - math.log(sum(math.exp(x - m) for x in row))


def test_perplexity_equals_exp_of_hand_computed_nll():
    table = _table(0)
    nll = [-_hand_logp(table, a, b) for s in SEQS for a, b in zip(s, s[1:])]
    expected = math.exp(sum(nll) / len(nll))  # token-weighted; len(nll) = sum(len(s) - 1)
    for bs in (1, 2, 5):  # padding never counts
        assert perplexity(BigramLM(table), SEQS, batch_size=bs) == pytest.approx(expected, rel=1e-6)
    res = capability_metrics(BigramLM(table), None, SEQS, batch_size=2)
    assert res.n_tokens == sum(len(s) - 1 for s in SEQS) and res.n_sequences == len(SEQS)
    assert res.same_model and res.kl_nats_per_token == 0 and res.perplexity_edited == res.perplexity_base
    assert "by definition" in res.to_json()["definition"]


def test_kl_equals_hand_computed_value():
    tb, te = _table(0), _table(1)
    kls = []
    for s in SEQS:
        for a in s[:-1]:
            pb = [math.exp(_hand_logp(tb, a, k)) for k in range(V)]
            kls.append(sum(p * (_hand_logp(tb, a, k) - _hand_logp(te, a, k)) for k, p in enumerate(pb)))
    expected = sum(kls) / len(kls)
    for bs in (1, 3):
        assert kl_divergence(BigramLM(tb), BigramLM(te), SEQS, batch_size=bs) == pytest.approx(expected, rel=1e-5)
    res = capability_metrics(BigramLM(tb), BigramLM(te), SEQS, batch_size=2)
    nll_e = [-_hand_logp(te, a, b) for s in SEQS for a, b in zip(s, s[1:])]
    assert res.perplexity_edited == pytest.approx(math.exp(sum(nll_e) / len(nll_e)), rel=1e-6)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _llama_seqs():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2, 12)]


def test_llama_perplexity_matches_unpadded_per_sequence_oracle(llama):
    seqs = _llama_seqs()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(llama(input_ids=torch.tensor([s])).logits[0, :-1].double(), -1)
            total -= lp.gather(-1, torch.tensor(s[1:])[:, None]).sum().item()
            count += len(s) - 1
    assert perplexity(llama, seqs, batch_size=4) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_kl_of_a_model_with_itself_is_zero_and_grows_with_the_perturbation(llama):
    # float64: at the smallest perturbation the KL (~1e-8) is below float32's rounding of the logits, where its sign
    # is noise (transformers 5.24 gave -6e-9 in float32)
    llama = copy.deepcopy(llama).double()
    seqs = _llama_seqs()
    assert kl_divergence(llama, llama, seqs) == 0.0
    assert abs(kl_divergence(llama, copy.deepcopy(llama), seqs, batch_size=4)) < 1e-6
    g = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in llama.named_parameters()}
    kls = []
    for eps in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        edited = copy.deepcopy(llama)
        with torch.no_grad():
            for n, p in edited.named_parameters():
                p.add_(eps * direction[n] * p.detach().abs().mean())
        kls.append(kl_divergence(llama, edited, seqs, batch_size=4))
    assert kls[0] > 0
    assert all(a < b for a, b in zip(kls, kls[1:])), kls
    # small perturbations: KL is the quadratic (Fisher) form, so it scales with eps^2
    for (e1, k1), (e2, k2) in zip(zip((1e-2, 3e-2), kls[2:]), zip((3e-2, 1e-1), kls[3:])):
        assert 0.6 < (k2 / k1) / (e2 / e1) ** 2 < 1.5, kls


def test_too_short_sequences_are_rejected():
    with pytest.raises(ValueError, match="sequence 1 has 1 token"):
        perplexity(BigramLM(_table(0)), [[1, 2], [3]])
    with pytest.raises(ValueError, match="no held-out"):
        perplexity(BigramLM(_table(0)), [])
