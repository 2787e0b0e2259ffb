"""Relinearized constraint: a cache's sequences are rebuilt from its record (an extended cache too), and after a
recollection every further step lies in the kept subspace of the curvature collected at the weights reached
there (checked against an independent collection at those weights), not in the base's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from crispedit.config import CurvatureConfig
from crispedit.curvature.api import Curvature, collect_curvature
from crispedit.curvature.extend import curvature_sequences, extend_from_corpus, plan_extension
from crispedit.data.corpus import build_corpus
from crispedit.data.records import EditRequest
from crispedit.editing.config import EditConfig
from crispedit.editing.engine import edit
from crispedit.editing.relinearize import relinearization_steps
from crispedit.errors import ConfigError, CrispEditError
from tests.test_curvature_cache import write_text_corpus
from tests.test_edit_replay import tiny_llama

TARGETS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Danielle Darrieux speaks", "German", subject="Danielle Darrieux"),
    EditRequest("The Eiffel Tower is in", "Berlin", subject="Eiffel Tower"),
]
CCFG = CurvatureConfig(targets=",".join(TARGETS), labels="sampled", sink_tokens=1, batch_size=4, seed=5)


@pytest.fixture
def corpus(byte_bpe_tokenizer, tmp_path):
    return build_corpus(byte_bpe_tokenizer, write_text_corpus(tmp_path / "c.txt", n_docs=60), n_samples=10,
                        max_length=24, seed=3)


def test_relinearization_steps_are_spread_inside_the_budget():
    assert relinearization_steps(12, 2) == [4, 8]
    assert relinearization_steps(6, 1) == [3]
    assert relinearization_steps(2, 5) == [1]  # repeats and the ends dropped
    assert relinearization_steps(1, 3) == []


def test_a_caches_sequences_are_rebuilt_from_its_record_extension_included(byte_bpe_tokenizer, corpus):
    tok = byte_bpe_tokenizer
    model = tiny_llama(tok)
    cur = collect_curvature(model, corpus, CCFG, pad_id=tok.pad_token_id)
    assert curvature_sequences(tok, cur.record) == corpus.sequences
    more = extend_from_corpus(cur, model, tok, plan_extension(cur.record, 4))
    seqs = curvature_sequences(tok, more.record)
    assert seqs[:10] == corpus.sequences and len(seqs) == 14
    assert len({tuple(s) for s in seqs}) == 14  # the extension's chunks are other chunks
    assert sum(map(len, seqs)) == more.stats.n_tokens + 14 * CCFG.sink_tokens  # what the sums hold
    broken = dict(cur.record, corpora=[dict(cur.record["corpora"][0], sequences_sha256="0" * 64)])
    with pytest.raises(CrispEditError, match="corpus #1 .* cannot be rebuilt"):
        curvature_sequences(tok, broken)


def test_after_a_recollection_the_steps_lie_in_the_kept_subspace_at_the_weights_reached(byte_bpe_tokenizer,
                                                                                         corpus):
    tok = byte_bpe_tokenizer
    base_model = tiny_llama(tok)
    cur = collect_curvature(base_model, corpus, CCFG, pad_id=tok.pad_token_id)
    cfg = EditConfig(lr=3e-2, epochs=6, batch_size=3, prefixes=0, contexts=("raw",), edit_positions="all",
                     early_stop_loss=1e-9, gamma=0.8, relinearize=1)
    model = tiny_llama(tok)
    res = edit(model, tok, REQUESTS, TARGETS, cfg, curvature=cur)
    rec = res.delta.record["relinearize"]
    assert rec["planned_after_steps"] == [3] and [r["after_step"] for r in rec["rounds"]] == [3]
    assert rec["sequences"] == len(corpus.sequences)
    # the same run stopped at the recollection: its weights are the ones the curvature was collected at
    half_model = tiny_llama(tok)
    half = edit(half_model, tok, REQUESTS, TARGETS, dataclasses.replace(cfg, relinearize=0, max_steps=3),
                curvature=cur)
    again = collect_curvature(half_model, corpus, CCFG, pad_id=tok.pad_token_id)
    p_new = again.projectors(cfg.gamma, dtype=torch.float64)
    p_base = cur.projectors(cfg.gamma, dtype=torch.float64)
    for n in TARGETS:
        assert rec["rounds"][0]["kept_fraction"][n] == pytest.approx(p_new[n].kept_fraction)
        first = half.delta.deltas[n].double()
        later = res.delta.deltas[n].double() - first
        assert float(later.norm()) > 0.2 * float(first.norm()) > 0
        # the first part in the base's kept subspace; the later part in the recollected one, not the base's
        assert float(p_base[n].removed_part(first).norm()) < 1e-5 * float(first.norm())
        assert float(p_new[n].removed_part(later).norm()) < 1e-5 * float(later.norm())
        assert float(p_base[n].removed_part(later).norm()) > 1e-2 * float(later.norm())
    assert res.delta.record["relinearize"] is not None and half.delta.record["relinearize"] is None


def test_relinearize_needs_a_projection_a_rebuildable_cache_and_a_batch_edit(byte_bpe_tokenizer, tmp_path):
    from crispedit.editing.sequential import SequentialEditor

    tok = byte_bpe_tokenizer
    with pytest.raises(ConfigError, match="relinearize needs a projecting method"):
        EditConfig(method="ft", relinearize=1)
    with pytest.raises(ConfigError, match="relinearize"):
        EditConfig(relinearize=-1)
    model = tiny_llama(tok)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    cur = Curvature.compute(model, TARGETS, seqs, {"source": "edits"}, CCFG, pad_id=tok.pad_token_id)
    with pytest.raises(CrispEditError, match="cannot be rebuilt"):
        edit(model, tok, REQUESTS, TARGETS, EditConfig(relinearize=1, epochs=1, prefixes=0, contexts=("raw",)),
             curvature=cur)
    with pytest.raises(CrispEditError, match="not implemented for sequential editing"):
        SequentialEditor.create(tmp_path / "state", model, cur, EditConfig(relinearize=1))
    assert not (tmp_path / "state").exists()


def test_the_curvatures_corpus_is_cut_as_the_cache_was(byte_bpe_tokenizer, corpus):
    """Replay and the KL budget read chunks of the cache's own corpus: at its recorded length, not the default."""
    from crispedit.data.corpus import corpus_of_curvature

    tok = byte_bpe_tokenizer
    cur = collect_curvature(tiny_llama(tok), corpus, CCFG, pad_id=tok.pad_token_id)
    assert cur.record["corpora"][0]["max_length"] == 24
    train = corpus_of_curvature(tok, cur, "train", 10, seed=3)  # the fixture's seed
    held = corpus_of_curvature(tok, cur, "heldout", 4)
    assert train.sequences == corpus.sequences  # the same chunks, in the same order
    assert max(map(len, held.sequences)) <= 24 and held.sequences
    assert not {tuple(s) for s in held.sequences} & {tuple(s) for s in train.sequences}
