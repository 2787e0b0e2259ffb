"""EK-FAC on a language model: the corrected eigenvalues are the second moments of each sequence's exact weight
gradient in the K-FAC eigenbasis (checked against autograd on the weight), they do not depend on how sequences
are batched, and an edit with `eigenvalues="ekfac"` stays in the kept subspace they define."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from crispedit.config import CurvatureConfig
from crispedit.curvature.api import collect_curvature
from crispedit.curvature.ekfac import collect_ekfac_lm
from crispedit.data.corpus import build_corpus
from crispedit.editing.config import EditConfig
from crispedit.editing.engine import edit
from crispedit.errors import ConfigError, CrispEditError
from tests.test_curvature_cache import write_text_corpus
from tests.test_edit_relinearize import REQUESTS, TARGETS
from tests.test_edit_replay import tiny_llama


@pytest.fixture
def corpus(byte_bpe_tokenizer, tmp_path):
    return build_corpus(byte_bpe_tokenizer, write_text_corpus(tmp_path / "c.txt", n_docs=60), n_samples=8,
                        max_length=20, seed=3)


def weight_gradient_moments(model, seqs, eigen, sink: int) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n (U_Sᵀ ∇_W L_n U_A)² with L_n the summed next-token loss of sequence n, the first `sink` positions'
    contribution left out (autograd on the weights themselves)."""
    out = {n: torch.zeros(e.d_out, e.d_in, dtype=torch.float64) for n, e in eigen.items()}
    count = 0
    for s in seqs:
        ids = torch.tensor([s])
        # the sink positions' own term g_t a_tᵀ is left out: there the output is computed from a detached weight
        handles = []
        for name in eigen:
            def post(mod, inp, out):
                fixed = torch.nn.functional.linear(inp[0][:, :sink], mod.weight.detach(), None)
                return torch.cat([fixed, out[:, sink:]], dim=1)
            handles.append(model.get_submodule(name).register_forward_hook(post))
        weights = [model.get_submodule(n).weight for n in eigen]
        logits = model(input_ids=ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, weights)
        for h in handles:
            h.remove()
        for (name, e), g in zip(eigen.items(), grads):
            out[name] += (e.U_S.T @ g @ e.U_A) ** 2
        count += len(s) - sink
    return {n: v / count for n, v in out.items()}


def test_ekfac_eigenvalues_are_the_moments_of_each_sequences_weight_gradient(byte_bpe_tokenizer, corpus):
    tok = byte_bpe_tokenizer
    model = tiny_llama(tok)
    cfg = CurvatureConfig(targets=",".join(TARGETS), labels="empirical", sink_tokens=1, batch_size=3, seed=5)
    cur = collect_curvature(model, corpus, cfg, pad_id=tok.pad_token_id)
    eks = collect_ekfac_lm(model, corpus.sequences, cur.eigen, cfg, pad_id=tok.pad_token_id)
    oracle = weight_gradient_moments(model, corpus.sequences, cur.eigen, cfg.sink_tokens)
    for n in TARGETS:
        e = eks[n]
        r = cur.eigen[n].n_sink
        assert r > 0 and torch.isinf(e.lam[:, :r]).all()
        assert torch.allclose(e.lam[:, r:], oracle[n][:, r:], rtol=1e-8, atol=1e-14)
        # a sequence's positions share one gradient: EK-FAC is not K-FAC's per-position products
        prods = torch.outer(cur.eigen[n].lam_S, cur.eigen[n].lam_A[r:])
        assert not torch.allclose(e.lam[:, r:], prods, rtol=0.1)


def test_sampled_ekfac_eigenvalues_do_not_depend_on_the_batching(byte_bpe_tokenizer, corpus):
    tok = byte_bpe_tokenizer
    model = tiny_llama(tok)
    cfg = CurvatureConfig(targets=",".join(TARGETS), labels="sampled", sink_tokens=1, batch_size=1, seed=5)
    cur = collect_curvature(model, corpus, cfg, pad_id=tok.pad_token_id)
    one = collect_ekfac_lm(model, corpus.sequences, cur.eigen, cfg, pad_id=tok.pad_token_id)
    four = collect_ekfac_lm(model, corpus.sequences, cur.eigen, dataclasses.replace(cfg, batch_size=4),
                            pad_id=tok.pad_token_id)
    other = collect_ekfac_lm(model, corpus.sequences, cur.eigen, dataclasses.replace(cfg, seed=6),
                             pad_id=tok.pad_token_id)
    for n in TARGETS:
        r = cur.eigen[n].n_sink
        assert torch.allclose(one[n].lam[:, r:], four[n].lam[:, r:], rtol=1e-9, atol=1e-15)
        assert not torch.allclose(one[n].lam[:, r:], other[n].lam[:, r:], rtol=1e-3)  # the labels matter


def test_an_ekfac_edit_stays_in_the_corrected_kept_subspace(byte_bpe_tokenizer, corpus):
    tok = byte_bpe_tokenizer
    ccfg = CurvatureConfig(targets=",".join(TARGETS), labels="sampled", sink_tokens=1, batch_size=4, seed=5)
    cur = collect_curvature(tiny_llama(tok), corpus, ccfg, pad_id=tok.pad_token_id)
    cfg = EditConfig(lr=3e-2, epochs=3, batch_size=3, prefixes=0, contexts=("raw",), edit_positions="all",
                     early_stop_loss=1e-9, gamma=0.8, eigenvalues="ekfac")
    res = edit(tiny_llama(tok), tok, REQUESTS, TARGETS, cfg, curvature=cur)
    rec = res.delta.record["ekfac"]
    assert rec["sequences"] == len(corpus.sequences)
    p_ek = cur.projectors(cfg.gamma, kind="ekfac", dtype=torch.float64)
    p_k = cur.projectors(cfg.gamma, kind="kfac", dtype=torch.float64)
    for n in TARGETS:
        d = res.delta.deltas[n].double()
        assert rec["kept_fraction"][n] == pytest.approx(p_ek[n].kept_fraction)
        assert float(d.norm()) > 0
        assert float(p_ek[n].removed_part(d).norm()) < 1e-5 * float(d.norm())
        assert float(p_k[n].removed_part(d).norm()) > 1e-3 * float(d.norm())  # another subspace than K-FAC's
        assert res.delta.record["diagnostics"][n]["removed_energy_fraction"] < 1e-10  # judged by its own masks
    plain = edit(tiny_llama(tok), tok, REQUESTS, TARGETS, dataclasses.replace(cfg, eigenvalues="kfac"),
                 curvature=collect_curvature(tiny_llama(tok), corpus, ccfg, pad_id=tok.pad_token_id))
    assert plain.delta.record["ekfac"] is None


def test_ekfac_needs_the_kfac_projection_and_a_batch_edit(byte_bpe_tokenizer, corpus, tmp_path):
    from crispedit.editing.sequential import SequentialEditor

    with pytest.raises(ConfigError, match="eigenvalues 'ekfac' needs method 'crispedit'"):
        EditConfig(method="adam-nscl", eigenvalues="ekfac")
    with pytest.raises(ConfigError, match="with relinearize is not implemented"):
        EditConfig(eigenvalues="ekfac", relinearize=1)
    with pytest.raises(ConfigError, match="eigenvalues"):
        EditConfig(eigenvalues="diagonal")
    tok = byte_bpe_tokenizer
    model = tiny_llama(tok)
    ccfg = CurvatureConfig(targets=",".join(TARGETS), labels="sampled", sink_tokens=1, batch_size=4, seed=5)
    cur = collect_curvature(model, corpus, ccfg, pad_id=tok.pad_token_id)
    with pytest.raises(CrispEditError, match="not implemented for sequential editing"):
        SequentialEditor.create(tmp_path / "state", model, cur, EditConfig(eigenvalues="ekfac"))
    assert not (tmp_path / "state").exists()
    with pytest.raises(CrispEditError, match="call correct_eigenvalues first"):
        cur.projectors(0.9, kind="ekfac")
