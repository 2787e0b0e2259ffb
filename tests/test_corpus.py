"""Capability corpus: the embedded Wikipedia excerpt parses to clean prose; splits, chunks and samples are
deterministic, disjoint and fingerprinted."""

from __future__ import annotations

import bz2
import json
import time

import pytest

from crispedit.data import corpus as corpus_mod
from crispedit.data import wiki
from crispedit.data.corpus import (
    CapabilityCorpus,
    build_corpus,
    chunk_document,
    load_documents,
    shard,
    special_tokens_around,
    split_documents,
)
from crispedit.errors import CrispEditError

BOS, EOS = "<s>", "</s>"


def _tokenizer(texts, with_bos: bool = True):
    """A tiny word-level tokenizer trained in memory (no hub); adds BOS by default like Llama, or nothing like GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2000,
                                                             special_tokens=["<unk>", BOS, EOS, "<pad>"]))
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def paragraphs():
    try:
        wiki.default_dump_path()
    except CrispEditError as e:
        pytest.skip(str(e))
    return wiki.wikipedia_paragraphs()


@pytest.fixture(scope="module")
def tokenizer(paragraphs):
    return _tokenizer(paragraphs[:400])


# ---------------------------------------------------------------------------------------------
# Wikipedia excerpt


def test_embedded_excerpt_is_clean_prose(paragraphs):
    assert 3500 <= len(paragraphs) <= 5500
    assert all(len(p) >= 200 for p in paragraphs)
    for tok in ("{{", "}}", "[[", "]]", "<ref", "</", "{|", "'''", "&nbsp;", "&quot;", "==", "\n"):
        bad = [p for p in paragraphs if tok in p]
        assert not bad, f"{tok!r} left in {len(bad)} paragraphs, e.g. {bad[0][:200]!r}"
    # A known opening paragraph, with links resolved to their text and refs removed.
    anarchism = [p for p in paragraphs if p.startswith("Anarchism is a political philosophy")]
    assert len(anarchism) == 1
    assert anarchism[0].startswith("Anarchism is a political philosophy that advocates self-governed societies "
                                   "based on voluntary institutions. These are often described as stateless "
                                   "societies, although several authors")
    assert len(set(paragraphs)) > 0.99 * len(paragraphs)


def test_excerpt_parses_in_a_few_seconds(paragraphs):
    t = time.perf_counter()
    n = sum(1 for _ in wiki.iter_paragraphs())
    elapsed = time.perf_counter() - t
    assert n == len(paragraphs)
    assert elapsed < 10, f"parsing took {elapsed:.1f}s"


def test_clean_wikitext_markup():
    src = (
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}\n"
        "'''Ada''' (born {{dob|1815}}) was a [[mathematician]] and [[writer|author]]<ref name=a>Some "
        "[[source]]</ref> of ''notes''.<ref name=b /> She &amp; Babbage used [[Analytical Engine]]s.<!-- hidden -->\n"
        "[[File:Ada.jpg|thumb|Ada by [[Alfred Chalon|Chalon]]]]\n"
        "A line after the image. [http://example.org An external site] and [http://x.org].\n"
        "A second line of the same paragraph.\n"
        "\n"
        "== Early life ==\n"
        "{| class=\"wikitable\"\n|-\n| cell || {{flag|UK}}\n{|\n| nested\n|}\n|}\n"
        "* list item one &ndash; with dash\n"
        "# numbered <span style=\"x\">item</span>\n"
        "[[Category:Mathematicians]]\n"
        "[[de:Ada Lovelace]]\n"
        "<math>x^2</math>Text after math. __NOTOC__\n"
    )
    out = wiki.clean_wikitext(src)
    assert out.split("\n\n") == [
        "Ada (born) was a mathematician and author of notes. She & Babbage used Analytical Engines.",
        "A line after the image. An external site and. A second line of the same paragraph.",
        "list item one – with dash",
        "numbered item",
        "Text after math.",
    ]


def _write_dump(path, pages):
    redirect = '<redirect title="Y" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns><id>{i}</id>{redirect if redir else ''}"
        f"<revision><text xml:space=\"preserve\">{text}</text></revision></page>"
        for i, (t, ns, redir, text) in enumerate(pages))
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(xml)
    return path


def test_dump_reader_skips_redirects_and_other_namespaces(tmp_path):
    long = "word " * 60
    path = _write_dump(tmp_path / "mini.xml.bz2", [
        ("Real", 0, False, f"'''Real''' article. {long}\n\nshort"),
        ("Redir", 0, True, "#REDIRECT [[Real]]"),
        ("Talk:Real", 1, False, f"Talk text {long}"),
        ("Other", 0, False, f"Other &lt;ref&gt;cite&lt;/ref&gt;article {long}"),
    ])
    assert [t for t, _ in wiki.iter_articles(path)] == ["Real", "Other"]
    docs = load_documents(path)
    assert docs == [f"Real article. {long.strip()}", f"Other article {long.strip()}"]


def test_bad_dump_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text("<mediawiki><page><title>x</title></mediawiki>")
    with pytest.raises(CrispEditError, match=r"bad\.xml: not a valid MediaWiki XML dump \(line 1"):
        wiki.wikipedia_paragraphs(path)


def test_missing_gensim_says_how_to_install(monkeypatch):
    monkeypatch.setattr(wiki.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CrispEditError, match=r"pip install --no-deps gensim==4\.4\.0"):
        wiki.default_dump_path()


# ---------------------------------------------------------------------------------------------
# document sources


def test_txt_jsonl_and_folder_sources(tmp_path):
    (tmp_path / "b.txt").write_text("first doc\n\n  second doc  \n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "json one", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "  "}) + "\n" + json.dumps({"text": "json two"}) + "\n")
    (tmp_path / "c.md").write_text("ignored")
    assert load_documents(tmp_path / "b.txt") == ["first doc", "second doc"]
    assert load_documents(tmp_path / "a.jsonl") == ["json one", "json two"]
    assert load_documents(tmp_path) == ["json one", "json two", "first doc", "second doc"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert load_documents(tmp_path / "d.jsonl", text_field="body") == ["x"]


def test_wikipedia_source_names(paragraphs):
    assert load_documents(None) == paragraphs
    assert load_documents("wikipedia") == paragraphs


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": }\n', r"^x\.jsonl: line 2: invalid JSON at column"),
    ('{"text": "ok"}\n\n{"txt": "no"}\n', r"^x\.jsonl: line 3: field 'text' is missing$"),
    ('{"text": 3}\n', r"^x\.jsonl: line 1: field 'text' must be a string, got int$"),
    ('["text"]\n', r"^x\.jsonl: line 1: expected a JSON object"),
])
def test_bad_jsonl_records(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(CrispEditError, match=message):
        load_documents(tmp_path / "x.jsonl")


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CrispEditError, match=r"corpus .*empty\.txt contains no documents"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CrispEditError, match=r"corpus folder .*folder contains no \.txt or \.jsonl files"):
        load_documents(tmp_path / "folder")
    with pytest.raises(CrispEditError, match=r"corpus source not found: .*nope\.txt"):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CrispEditError, match=r"unsupported corpus file .*x\.csv"):
        load_documents(tmp_path / "x.csv")


# ---------------------------------------------------------------------------------------------
# splits and shards


def test_split_is_disjoint_complete_and_deterministic(paragraphs):
    train, held = split_documents(paragraphs, 0.1, seed=0)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(paragraphs)
    assert 0.07 * len(paragraphs) < len(held) < 0.13 * len(paragraphs)
    assert split_documents(paragraphs, 0.1, seed=0) == (train, held)
    # order within each part is the input order
    pos = {p: i for i, p in enumerate(paragraphs)}
    assert [pos[p] for p in held] == sorted(pos[p] for p in held)
    _, held1 = split_documents(paragraphs, 0.1, seed=1)
    assert held1 != held


def test_heldout_is_stable_when_documents_are_added(paragraphs):
    base = paragraphs[:2000]
    train, held = split_documents(base, 0.2, seed=3)
    extra = [f"a new document number {i}" for i in range(500)]
    train2, held2 = split_documents(extra[:250] + base + extra[250:], 0.2, seed=3)
    assert [p for p in held2 if p in set(base)] == held
    assert [p for p in train2 if p in set(base)] == train


def test_split_edge_cases():
    docs = [f"doc {i}" for i in range(100)]
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(CrispEditError, match="heldout_fraction must be in"):
        split_documents(docs, 1.0)
    # identical texts always land on the same side
    train, held = split_documents(["same"] * 10 + docs, 0.5)
    assert train.count("same") in (0, 10)


def test_shard_round_robin():
    seqs = list(range(10))
    parts = [shard(seqs, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shard(seqs, 0, 1) == seqs
    for rank, world in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(CrispEditError, match="invalid distributed rank"):
            shard(seqs, rank, world)


# ---------------------------------------------------------------------------------------------
# chunks and the tokenised corpus


def test_chunk_document_exact():
    ids = list(range(100, 120))
    assert chunk_document(ids, 8, prefix=[1], min_tokens=3) == [
        [1] + list(range(100, 107)), [1] + list(range(107, 114)), [1] + list(range(114, 120))]
    assert chunk_document(ids, 8, prefix=[1], min_tokens=7) == [
        [1] + list(range(100, 107)), [1] + list(range(107, 114))]  # 6-token tail dropped
    assert chunk_document(ids, 8, prefix=[1], suffix=[2], min_tokens=3) == [
        [1] + list(range(a, a + 6)) + [2] for a in (100, 106, 112)]  # tail [118, 119] dropped
    with pytest.raises(CrispEditError, match="leaves no room"):
        chunk_document(ids, 2, prefix=[1], suffix=[2])


def test_special_tokens_around(tokenizer, paragraphs):
    bos = tokenizer.convert_tokens_to_ids(BOS)
    assert special_tokens_around(tokenizer) == ([bos], [])
    assert special_tokens_around(_tokenizer(paragraphs[:50], with_bos=False)) == ([], [])


def test_build_corpus_train(tokenizer):
    c = build_corpus(tokenizer, n_samples=300, max_length=64)
    assert isinstance(c, CapabilityCorpus)
    bos = tokenizer.convert_tokens_to_ids(BOS)
    assert len(c.sequences) == c.n_samples == 300
    assert all(len(s) <= 64 and s[0] == bos and len(s) >= 1 + corpus_mod.MIN_CHUNK_TOKENS for s in c.sequences)
    assert all(bos not in s[1:] for s in c.sequences)
    assert c.n_tokens == sum(map(len, c.sequences))
    assert len({tuple(s) for s in c.sequences}) == 300
    d = c.describe()
    assert d == {
        "source": "wikipedia", "split": "train", "n_samples": 300, "n_tokens": c.n_tokens, "max_length": 64,
        "seed": 0, "heldout_fraction": 0.1, "split_seed": 0, "n_documents": c.n_documents,
        "n_chunks_available": c.n_chunks_available, "fingerprint": c.fingerprint,
    }
    json.dumps(d)
    # deterministic
    again = build_corpus(tokenizer, n_samples=300, max_length=64)
    assert again.sequences == c.sequences and again.fingerprint == c.fingerprint
    # a larger sample extends a smaller one (selection is a fixed seeded ranking)
    bigger = build_corpus(tokenizer, n_samples=400, max_length=64)
    assert bigger.sequences[:300] == c.sequences and bigger.fingerprint != c.fingerprint


def test_fingerprint_changes_with_seed_and_settings(tokenizer):
    base = build_corpus(tokenizer, n_samples=100, max_length=64, seed=0)
    other_seed = build_corpus(tokenizer, n_samples=100, max_length=64, seed=1)
    assert other_seed.fingerprint != base.fingerprint
    assert other_seed.sequences != base.sequences
    assert build_corpus(tokenizer, n_samples=100, max_length=48).fingerprint != base.fingerprint
    # the sampling seed selects chunks but never moves documents between train and held-out
    assert other_seed.n_documents == base.n_documents
    assert build_corpus(tokenizer, n_samples=100, max_length=64, split_seed=1).fingerprint != base.fingerprint


def test_heldout_corpus_is_disjoint_from_train(tokenizer):
    train = build_corpus(tokenizer, max_length=128)
    held = build_corpus(tokenizer, max_length=128, split="heldout")
    assert held.split == "heldout" and held.n_samples == held.n_chunks_available > 0
    assert train.n_samples == train.n_chunks_available
    assert not {tuple(s) for s in train.sequences} & {tuple(s) for s in held.sequences}
    assert held.fingerprint != train.fingerprint
    assert 0.05 < held.n_tokens / (held.n_tokens + train.n_tokens) < 0.15


def test_too_few_chunks_names_the_numbers(tokenizer):
    held = build_corpus(tokenizer, max_length=256, split="heldout")
    n = held.n_chunks_available
    with pytest.raises(CrispEditError) as e:
        build_corpus(tokenizer, n_samples=n + 1, max_length=256, split="heldout")
    assert str(e.value) == f"corpus wikipedia has only {n} chunks of ≤256 tokens in split 'heldout', {n + 1} asked"
    assert build_corpus(tokenizer, n_samples=n, max_length=256, split="heldout").n_samples == n


def test_build_from_txt_source(tmp_path, paragraphs):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(paragraphs[:60]) + "\ntoo short\n")
    tok = _tokenizer(paragraphs[:60])
    c = build_corpus(tok, source=src, max_length=32, heldout_fraction=0.25, n_samples=20)
    assert c.source == str(src) and c.n_samples == 20 and all(len(s) <= 32 for s in c.sequences)
    with pytest.raises(CrispEditError, match=r"corpus .*docs\.txt has only \d+ chunks of ≤32 tokens in split "
                                             r"'train', 100000 asked"):
        build_corpus(tok, source=src, max_length=32, n_samples=100_000)
    with pytest.raises(CrispEditError, match="unknown corpus split 'test'"):
        build_corpus(tok, source=src, split="test")
    one = tmp_path / "one.txt"
    one.write_text("a single document that is long enough to chunk into pieces here\n")
    with pytest.raises(CrispEditError, match=r"corpus .*one\.txt has no documents in split 'heldout'"):
        build_corpus(tok, source=one, split="heldout", heldout_fraction=0.0)
