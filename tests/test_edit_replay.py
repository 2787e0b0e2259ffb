"""Capability replay: the term is the exact KL of the coarsened next-token distributions (checked against a
direct computation), zero at the base weights, never above the full KL, and an edit trained with it keeps the
model closer to its base on capability text than the same edit without it."""

from __future__ import annotations

import pytest
import torch

from crispedit.data.records import EditRequest
from crispedit.editing.config import EditConfig
from crispedit.editing.replay import CapabilityReplay, coarse_kl

TARGETS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Danielle Darrieux speaks", "German", subject="Danielle Darrieux"),
    EditRequest("The Eiffel Tower is in", "Berlin", subject="Eiffel Tower"),
]


def tiny_llama(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      initializer_range=0.3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).double().eval()


def chunks(tok, n: int = 6, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, len(tok), (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_coarse_kl_is_the_kl_of_the_coarsened_distributions_and_bounded_by_the_full_kl():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 50, generator=g, dtype=torch.float64) * 2
    edited = base + torch.randn(7, 50, generator=g, dtype=torch.float64)
    from crispedit.editing.replay import with_rest

    lp = torch.log_softmax(base, -1)
    top = torch.topk(lp, 5, dim=-1)
    got = coarse_kl(with_rest(top.values), top.indices, edited)
    p, q = lp.exp(), torch.softmax(edited, -1)
    for r in range(7):  # direct: six outcomes, the top five tokens and everything else
        keep = top.indices[r]
        rest = torch.ones(50, dtype=torch.bool)
        rest[keep] = False
        pc = torch.cat([p[r, keep], p[r, rest].sum()[None]])
        qc = torch.cat([q[r, keep], q[r, rest].sum()[None]])
        assert float(got[r]) == pytest.approx(float((pc * (pc / qc).log()).sum()), rel=1e-10, abs=1e-12)
    full = (p * (lp - torch.log_softmax(edited, -1))).sum(-1)
    assert bool((got >= -1e-12).all()) and bool((got <= full + 1e-12).all())
    assert float(coarse_kl(with_rest(top.values), top.indices, base).abs().max()) < 1e-12


def test_replay_is_zero_at_the_base_and_matches_a_direct_computation(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    model = tiny_llama(tok)
    seqs = chunks(tok)
    rep = CapabilityReplay(model, seqs, tok.pad_token_id, torch.Generator().manual_seed(0), per_step=2, top_k=4)
    with torch.no_grad():
        assert float(rep.kl(range(len(seqs)))) == pytest.approx(0.0, abs=1e-12)
        base_logits = [model(input_ids=torch.tensor([s])).logits[0, :-1] for s in seqs]
        w = model.get_submodule(TARGETS[0]).weight
        w.add_(0.3 * torch.randn_like(w))
        got = float(rep.kl(range(len(seqs))))  # padded batch; the oracle runs each chunk alone
        new_logits = [model(input_ids=torch.tensor([s])).logits[0, :-1] for s in seqs]
    from crispedit.editing.replay import with_rest

    per_token = []
    for b, e in zip(base_logits, new_logits):
        top = torch.topk(torch.log_softmax(b, -1), 4, dim=-1)
        per_token.append(coarse_kl(with_rest(top.values), top.indices, e))
    want = float(torch.cat(per_token).mean())
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-8)
    # every chunk is used once per cycle of len/per_step steps
    seen = [i for _ in range(3) for i in rep.next_chunks()]
    assert sorted(seen) == list(range(len(seqs)))


def test_an_edit_with_replay_stays_closer_to_the_base_on_capability_text(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    pool, other = chunks(tok, 8, seed=3), chunks(tok, 8, seed=4)

    def run(replay: int):
        model = tiny_llama(tok)
        base = tiny_llama(tok)
        ec = EditConfig(method="ft", lr=3e-2, epochs=15, batch_size=3, edit_positions="all", replay=replay,
                        replay_weight=3.0, prefixes=0, contexts=("raw",))
        from crispedit.editing.engine import edit

        res = edit(model, tok, REQUESTS, TARGETS, ec, replay_sequences=pool)
        kls = []
        for text in (pool, other):
            rep = CapabilityReplay(base, text, tok.pad_token_id, torch.Generator(), top_k=8)
            rep.model = model  # the base's distributions, the edited model's logits
            with torch.no_grad():
                kls.append(float(rep.kl(range(len(text)))))
        return res, kls

    plain, kl_plain = run(0)
    replayed, kl_replayed = run(2)
    assert replayed.epoch_losses[-1] < 0.5 * replayed.epoch_losses[0]  # the edit still trains
    assert kl_replayed[0] < 0.5 * kl_plain[0]  # on the replayed chunks
    assert kl_replayed[1] < 0.75 * kl_plain[1]  # and on chunks never replayed
    rec = replayed.delta.record["replay"]
    assert rec["chunks"] == len(pool) and rec["per_step"] == 2 and len(rec["kl_per_step"]) == replayed.steps
    assert plain.delta.record["replay"] is None


def test_replay_options_are_validated():
    from crispedit.errors import ConfigError

    with pytest.raises(ConfigError, match="replay"):
        EditConfig(replay=-1)
    with pytest.raises(ConfigError, match="replay_weight"):
        EditConfig(replay=1, replay_weight=-0.5)

