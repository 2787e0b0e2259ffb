"""The curvature cache: exact round trip, refusal of other models, merge/extend by addition, atomic writes,
and what the JSON record holds. Tiny float64 Llama from a config + the in-memory BPE tokenizer."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from crispedit import __version__
from crispedit.curvature import cache as cache_mod
from crispedit.curvature.api import Curvature, CurvatureConfig
from crispedit.curvature.cache import EIGEN, RECORD, STATS, CacheMismatchError
from crispedit.data.corpus import build_corpus
from crispedit.errors import CrispEditError

TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
EMPIRICAL = CurvatureConfig(labels="empirical", sink_tokens=1, batch_size=3)
WORDS = ("the cat sat on a mat and Paris is the capital of France while Rome has the Colosseum "
         "Shakespeare wrote Hamlet answer question yes no").split()
# Statistics are float64 sums of a float64 model: different batchings agree to round-off.
RTOL = 1e-11


def tiny_llama(vocab: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=1,
              eos_token_id=0, bos_token_id=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).double().eval()


def random_sequences(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(4, 18))] for _ in range(n)]


def write_text_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
                              for _ in range(n_docs)) + "\n")
    return path


@pytest.fixture
def tok(byte_bpe_tokenizer):
    return byte_bpe_tokenizer


@pytest.fixture
def model(tok):
    return tiny_llama(len(tok))


def compute(model, seqs, cfg=EMPIRICAL, label="seqs"):
    return Curvature.compute(model, TARGETS, seqs, {"source": label, "n_samples": len(seqs)}, cfg, pad_id=1,
                             progress=False)


def assert_stats_close(a: Curvature, b: Curvature, rtol: float = RTOL) -> None:
    assert a.targets == b.targets
    for name in a.targets:
        sa, sb = a.stats[name], b.stats[name]
        assert (sa.n, sa.n_sink) == (sb.n, sb.n_sink)
        for x, y in ((sa.A, sb.A), (sa.S, sb.S), (sa.A_sink, sb.A_sink)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()))
        ea, eb = a.eigen[name], b.eigen[name]
        assert ea.n_sink == eb.n_sink
        for x, y in ((ea.lam_A[ea.n_sink:], eb.lam_A[eb.n_sink:]), (ea.lam_S, eb.lam_S)):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10 * float(y.max()))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ round trip


def test_save_load_round_trip_is_exact(model, tok, tmp_path):
    cur = compute(model, random_sequences(9, len(tok), seed=1))
    path = cur.save(tmp_path / "cache")
    assert sorted(p.name for p in path.iterdir()) == sorted([RECORD, STATS, EIGEN])
    back = Curvature.load(path, model)
    assert back.targets == cur.targets
    for name in cur.targets:
        s, t = cur.stats[name], back.stats[name]
        assert (t.n, t.n_sink) == (s.n, s.n_sink) and s.n > 0 and s.n_sink == 9
        for x, y in ((s.A, t.A), (s.S, t.S)):
            assert y.dtype == torch.float64 and torch.equal(x, y)
        # The sink sum is stored as a low-rank factor F (A_sink = F Fᵀ): equal to float64 round-off.
        assert t.A_sink.dtype == torch.float64
        torch.testing.assert_close(t.A_sink, s.A_sink, rtol=0, atol=1e-13 * float(s.A_sink.abs().max()))
        e, f = cur.eigen[name], back.eigen[name]
        for k in ("lam_A", "U_A", "lam_S", "U_S"):
            assert torch.equal(getattr(e, k), getattr(f, k)), k
        assert (e.n_sink, e.clamped_A, e.clamped_S) == (f.n_sink, f.clamped_A, f.clamped_S)
    on_disk = json.loads((path / RECORD).read_text())
    assert back.record == on_disk
    # Everything the live object knew is in the record unchanged (JSON turns tuples into lists).
    assert {k: on_disk[k] for k in cur.record} == json.loads(json.dumps(cur.record))
    # The loaded cache projects exactly like the computed one.
    for name, m in cur.masks(0.9).items():
        assert torch.equal(m, back.masks(0.9)[name])
    # Re-decomposed from the loaded sums (what extend and merge do), the masks are the same and the
    # projectors equal to round-off: the low-rank sink factor loses nothing.
    again = Curvature.from_stats(back.stats, back.record)
    for g in (0.5, 0.9, 0.99):
        for name, m in cur.masks(g).items():
            assert torch.equal(m, again.masks(g)[name]), (g, name)
        pa, pb = cur.projectors(g, dtype=torch.float64), again.projectors(g, dtype=torch.float64)
        for name in cur.targets:
            assert cur.eigen[name].n_sink == again.eigen[name].n_sink
            X = torch.randn(*cur.stats[name].S.shape[:1], cur.stats[name].A.shape[0], dtype=torch.float64)
            assert torch.allclose(pa[name](X), pb[name](X), rtol=0, atol=1e-10 * float(X.abs().max()))


def test_record_holds_what_identifies_the_cache(model, tok, tmp_path):
    corpus = build_corpus(tok, write_text_corpus(tmp_path / "c.txt"), n_samples=12, max_length=24, seed=3)
    cfg = CurvatureConfig(labels="sampled", sink_tokens=1, batch_size=4)
    cur = Curvature.compute(model, TARGETS, corpus.sequences, corpus.describe(), cfg, pad_id=1, progress=False)
    rec = json.loads((cur.save(tmp_path / "cache") / RECORD).read_text())
    assert rec["format"] == cache_mod.FORMAT and rec["format_version"] == cache_mod.FORMAT_VERSION == 2
    assert rec["crispedit_version"] == __version__
    m = rec["model"]
    assert m["model_type"] == "llama" and len(m["weights_sha256"]) == 64 and len(m["config_sha256"]) == 64
    assert len(m["model_weights_sha256"]) == 64
    files = rec["integrity"]["files"]
    for f in (STATS, EIGEN):
        assert files[f]["bytes"] == (tmp_path / "cache" / f).stat().st_size and len(files[f]["sha256"]) == 64
    assert m["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert rec["targets"] == [{"name": n, "d_in": 64, "d_out": 32} for n in TARGETS]
    assert rec["collection"]["labels"] == "sampled" and rec["collection"]["sink_tokens"] == 1
    (c,) = rec["corpora"]
    assert c["fingerprint"] == corpus.fingerprint and len(c["fingerprint"]) == 64
    assert c["n_samples"] == 12 and c["n_tokens"] == corpus.n_tokens and c["max_length"] == 24
    assert c["seed"] == 3 and c["split"] == "train"
    # Tokens in A and S: every valid position but the first (sink) of each sequence.
    assert rec["n_tokens"] == corpus.n_tokens - 12
    assert rec["counts"][TARGETS[0]]["n"] == rec["n_tokens"] and rec["counts"][TARGETS[0]]["n_sink"] == 12
    assert rec["model_dtype"] == "float64" and rec["stats_dtype"] == "float64"
    assert set(rec["summary"]) == set(TARGETS) and rec["kept"]


# ------------------------------------------------------------------------------------------ mismatches


def test_other_weights_config_or_targets_are_refused_with_the_fields(model, tok, tmp_path):
    path = compute(model, random_sequences(6, len(tok), seed=2)).save(tmp_path / "cache")

    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights.get_submodule(TARGETS[1]).weight[0, 0] += 1e-3
    with pytest.raises(CacheMismatchError, match="weights_sha256") as e:
        Curvature.load(path, other_weights)
    assert "config_sha256" not in str(e.value)

    # Weights outside the targets change the statistics too (A below a target, S above it): refused.
    for other_layer in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head"):
        untargeted = copy.deepcopy(model)
        with torch.no_grad():
            untargeted.get_submodule(other_layer).weight.mul_(2)
        with pytest.raises(CacheMismatchError, match="model_weights_sha256") as e:
            Curvature.load(path, untargeted)
        assert "weights_sha256: cache" not in str(e.value).replace("model_weights_sha256", "")

    other_config = tiny_llama(len(tok), rms_norm_eps=1e-3)
    other_config.load_state_dict(model.state_dict())
    with pytest.raises(CacheMismatchError, match="config_sha256") as e:
        Curvature.load(path, other_config)
    assert "weights_sha256" not in str(e.value)

    other_shapes = tiny_llama(len(tok), intermediate_size=48)
    with pytest.raises(CacheMismatchError, match=r"target model\.layers\.0\.mlp\.down_proj: cache \(32x64\) "
                                                 r"model \(32x48\)"):
        Curvature.load(path, other_shapes)

    fewer_layers = tiny_llama(len(tok), num_hidden_layers=1)
    with pytest.raises(CacheMismatchError, match=r"target model\.layers\.1\.mlp\.down_proj: not in the model"):
        Curvature.load(path, fewer_layers)

    # The explicit override loads the same tensors anyway.
    for other in (other_weights, other_config, other_shapes, fewer_layers):
        forced = Curvature.load(path, other, allow_mismatch=True)
        assert torch.equal(forced.stats[TARGETS[0]].A, Curvature.load(path).stats[TARGETS[0]].A)


def test_unreadable_cache_is_a_clear_error(model, tok, tmp_path):
    path = compute(model, random_sequences(4, len(tok), seed=3)).save(tmp_path / "cache")
    (path / STATS).write_bytes((path / STATS).read_bytes()[:100])
    with pytest.raises(CrispEditError, match="cannot read cache tensors"):
        Curvature.load(path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CrispEditError, match="not a crispedit curvature cache"):
        Curvature.load(tmp_path / "plain")
    with pytest.raises(CrispEditError, match="does not exist"):
        Curvature.load(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ merge / extend


def test_merge_of_disjoint_caches_equals_the_cache_of_the_union(model, tok):
    seqs = random_sequences(14, len(tok), seed=4)
    first, second = seqs[:6], seqs[6:]
    merged = compute(model, first, label="first").merge(compute(model, second, label="second"))
    union = compute(model, seqs, label="union")
    assert_stats_close(merged, union)
    assert [c["source"] for c in merged.record["corpora"]] == ["first", "second"]
    assert merged.record["n_tokens"] == union.record["n_tokens"]
    rep_m, rep_u = merged.kept_report((0.9,)), union.kept_report((0.9,))
    for name in TARGETS:
        assert rep_m["0.9"][name]["layer"]["kept_fraction"] == pytest.approx(
            rep_u["0.9"][name]["layer"]["kept_fraction"], abs=2 / (32 * 64))


def test_extend_equals_merge(model, tok):
    first, second = random_sequences(5, len(tok), seed=5), random_sequences(7, len(tok), seed=6)
    base = compute(model, first, label="first")
    extended = base.extend(model, second, {"source": "second"}, pad_id=1, progress=False)
    merged = base.merge(compute(model, second, label="second"))
    assert_stats_close(extended, merged)
    assert [c["source"] for c in extended.record["corpora"]] == ["first", "second"]
    # The base cache is left as it was.
    assert base.stats[TARGETS[0]].n == compute(model, first).stats[TARGETS[0]].n


def test_merge_and_extend_refuse_what_does_not_add_up(model, tok):
    seqs = random_sequences(4, len(tok), seed=7)
    base = compute(model, seqs)
    sampled = compute(model, seqs, cfg=CurvatureConfig(labels="sampled", sink_tokens=1))
    with pytest.raises(CacheMismatchError, match="collection.labels"):
        base.merge(sampled)
    other = tiny_llama(len(tok), seed=1)
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        base.merge(compute(other, seqs))
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        base.extend(other, seqs, {"source": "x"}, pad_id=1, progress=False)


# ------------------------------------------------------------------------------------------ atomic writes


class Interrupted(Exception):
    pass


def interrupt_second_file(monkeypatch, exc: type[BaseException]) -> None:
    """Let the first tensor file be written, then fail: the cache is half written at that moment."""
    real = cache_mod.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise exc("interrupted while writing " + Path(filename).name)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache_mod, "save_file", flaky)


@pytest.mark.parametrize("exc", [Interrupted, KeyboardInterrupt])
def test_interrupted_save_leaves_no_cache_and_keeps_an_existing_one(model, tok, tmp_path, monkeypatch, exc):
    cur = compute(model, random_sequences(4, len(tok), seed=8))
    folder = tmp_path / "caches"
    folder.mkdir()
    with monkeypatch.context() as mp:
        interrupt_second_file(mp, exc)
        with pytest.raises(exc):
            cur.save(folder / "new")
    assert list(folder.iterdir()) == []  # no cache, no temporary folder

    existing = cur.save(folder / "old")
    before = snapshot(existing)
    other = compute(model, random_sequences(4, len(tok), seed=9))
    with monkeypatch.context() as mp:
        interrupt_second_file(mp, exc)
        with pytest.raises(exc):
            other.save(existing, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["old"]
    assert snapshot(existing) == before
    assert torch.equal(Curvature.load(existing, model).stats[TARGETS[0]].A, cur.stats[TARGETS[0]].A)


def test_existing_cache_is_not_overwritten_without_permission(model, tok, tmp_path):
    cur = compute(model, random_sequences(4, len(tok), seed=10))
    path = cur.save(tmp_path / "cache")
    before = snapshot(path)
    with pytest.raises(FileExistsError):
        compute(model, random_sequences(4, len(tok), seed=11)).save(path, overwrite=False)
    assert snapshot(path) == before and [p.name for p in tmp_path.iterdir()] == ["cache"]


# ------------------------------------------------------------------------------------------ bad corpora


def test_empty_or_short_corpus_is_a_clear_error(model, tok, tmp_path):
    with pytest.raises(CrispEditError, match="corpus is empty"):
        compute(model, [])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(CrispEditError, match=r"empty\.txt contains no documents"):
        build_corpus(tok, empty, n_samples=4)
    short = write_text_corpus(tmp_path / "short.txt", n_docs=3)
    with pytest.raises(CrispEditError, match=r"has only \d+ chunks .* 500 asked"):
        build_corpus(tok, short, n_samples=500, max_length=16)
