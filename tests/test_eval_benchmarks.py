"""Benchmarks on real items from ../shared/data/benchmarks: loaders, sampling, MC scoring, GSM8K, lm-eval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from crispedit.errors import CrispEditError
from crispedit.evaluation import benchmarks
from crispedit.evaluation.benchmarks import (
    benchmarks_root,
    gsm8k_exact_match,
    load_arc,
    load_gsm8k,
    load_mmlu,
    load_truthfulqa_mc1,
    run_lm_eval,
    run_mc_benchmark,
    sample_items,
    score_multiple_choice,
)
from crispedit.formatting import PromptFormat, encode_pair

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "benchmarks").resolve()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


class PreferringLM(nn.Module):
    """Random tiny-Llama logits plus +`strength` on every next token that continues one of the
    `preferred` token sequences: a model built to prefer given prompt+option continuations."""

    def __init__(self, base, preferred: list[list[int]], strength: float = 50.0):
        super().__init__()
        self.base, self.strength = base, strength
        self.trie: dict = {}  # token -> subtrie: the preferred sequences' prefixes
        for seq in preferred:
            node = self.trie
            for tok in seq:
                node = node.setdefault(tok, {})

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        for b, row in enumerate(input_ids.tolist()):
            node = self.trie
            for t, tok in enumerate(row):  # while row[:t+1] is a preferred prefix, boost its continuations
                node = node.get(tok)
                if node is None:
                    break
                for nxt in node:
                    logits[b, t, nxt] += self.strength
        return type("Out", (), {"logits": logits})()


class ConstantLM(nn.Module):
    """Uniform next-token distributions: every option token has the same log-prob."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def _real_items():
    items = (sample_items(load_mmlu(DATA), 3, seed=1) + sample_items(load_arc(DATA), 3, seed=1)
             + sample_items(load_truthfulqa_mc1(DATA), 3, seed=1))
    assert len({it.answer for it in items}) > 1  # not all at the same position
    return items


def _preferring(tok, biased_llama, items, pick):
    seqs = []
    for it in items:
        pair = encode_pair(tok, it.prompt, it.options[pick(it)], PromptFormat("raw"), add_eos=False)
        seqs.append(pair.input_ids)
    return PreferringLM(biased_llama(len(tok), seed=0), seqs)


def test_loaders_read_every_real_record():
    mmlu = load_mmlu(DATA)
    assert len(mmlu) == 14042 and len({it.id.split("/")[1] for it in mmlu}) == 57
    anatomy = [it for it in mmlu if it.id.startswith("mmlu/anatomy_test/")]
    first = anatomy[0]
    assert first.prompt.endswith("ipsilateral\nAnswer:") and "about anatomy" in first.prompt
    assert first.options[0] == "paralysis of the facial muscles." and first.answer == 0
    assert len(load_mmlu(DATA, split="dev")) == 285
    letters = load_mmlu(DATA, subjects=["anatomy"], style="letters")
    assert letters[0].options == ("A", "B", "C", "D")
    assert "\nB. paralysis of the facial muscles and loss" in letters[0].prompt
    arc = load_arc(DATA)
    assert len(arc) == 1150 and arc[0].answer == 2 and arc[0].options[2] == "Planetary days will become shorter."
    assert {len(it.options) for it in arc} == {3, 4, 5}
    tqa = load_truthfulqa_mc1(DATA)
    assert len(tqa) == 817
    assert tqa[0].options[tqa[0].answer] == "The watermelon seeds pass through your digestive system"
    assert "You grow watermelons in your stomach" in tqa[0].options
    assert load_truthfulqa_mc1(DATA) == tqa  # the option order is seeded, hence reproducible
    assert len({it.answer for it in tqa}) > 3  # and the best answer is not always first
    gsm = load_gsm8k(DATA)
    assert len(gsm) == 1319 and "<<" not in gsm[0]["answer"] and gsm[0]["answer"].endswith("#### 18")


def test_sampling_is_seeded_and_in_file_order():
    items = list(range(100))
    a, b = sample_items(items, 10, seed=0), sample_items(items, 10, seed=0)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert sample_items(items, 10, seed=1) != a
    assert sample_items(items, None) == items and sample_items(items, 500) == items


def test_mc_scoring_picks_the_option_the_model_prefers(byte_bpe_tokenizer, biased_llama):
    tok = byte_bpe_tokenizer
    items = _real_items()
    right = score_multiple_choice(_preferring(tok, biased_llama, items, lambda it: it.answer), tok, items,
                                  batch_size=5)
    assert right["acc"] == 1.0 and right["acc_norm"] == 1.0 and right["n"] == len(items)
    assert [r["pred"] for r in right["items"]] == [it.answer for it in items]
    wrong = score_multiple_choice(
        _preferring(tok, biased_llama, items, lambda it: (it.answer + 1) % len(it.options)), tok, items)
    assert wrong["acc"] == 0.0 and wrong["acc_norm"] == 0.0
    assert [r["pred"] for r in wrong["items"]] == [(it.answer + 1) % len(it.options) for it in items]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_cache_gives_the_padded_batch_scores(arch, byte_bpe_tokenizer, biased_llama, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_bpe_tokenizer
    items = _real_items()
    if arch == "llama":
        model = biased_llama(len(tok), seed=2, init_std=0.3)
    else:
        torch.manual_seed(2)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                                           initializer_range=0.3)).eval()
    monkeypatch.setattr(benchmarks, "target_predictions", None)  # the shared path must not fall back
    shared = score_multiple_choice(model, tok, items, share_prompt=True)
    monkeypatch.undo()
    plain = score_multiple_choice(model, tok, items, share_prompt=False, batch_size=7)
    for a, b in zip(shared["items"], plain["items"]):
        assert a["logprob_sums"] == pytest.approx(b["logprob_sums"], rel=1e-5, abs=1e-4)
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
    assert (shared["acc"], shared["acc_norm"]) == (plain["acc"], plain["acc_norm"])


def test_ties_count_as_wrong(byte_bpe_tokenizer):
    items = _real_items()
    res = score_multiple_choice(ConstantLM(len(byte_bpe_tokenizer)), byte_bpe_tokenizer, items)
    assert res["acc_norm"] == 0.0  # every option has the same mean log-prob: no option wins


def test_run_mc_benchmark_records_its_protocol(byte_bpe_tokenizer, biased_llama, monkeypatch, tmp_path):
    tok = byte_bpe_tokenizer
    model = biased_llama(len(tok), seed=0)
    res = run_mc_benchmark("arc", model, tok, limit=4, seed=3, root=DATA)
    assert res["n"] == 4 and res["seed"] == 3 and res["n_available"] == 1150 and res["task"] == "arc"
    again = run_mc_benchmark("arc", model, tok, limit=4, seed=3, root=DATA)
    assert [r["id"] for r in again["items"]] == [r["id"] for r in res["items"]] and again["acc"] == res["acc"]
    # where the data are looked for: the argument, else $CRISPEDIT_BENCHMARKS, else ../shared/data/benchmarks
    monkeypatch.setenv("CRISPEDIT_BENCHMARKS", str(DATA))
    assert benchmarks_root() == DATA and benchmarks_root(tmp_path) == tmp_path
    monkeypatch.delenv("CRISPEDIT_BENCHMARKS")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert benchmarks_root().resolve() == (tmp_path / "shared" / "data" / "benchmarks").resolve()


def test_missing_data_names_the_path(tmp_path, byte_bpe_tokenizer, biased_llama):
    with pytest.raises(CrispEditError, match=str(tmp_path / "arc" / "ARC-Challenge-Test.jsonl")):
        load_arc(tmp_path)
    with pytest.raises(CrispEditError, match=str(tmp_path / "truthfulqa" / "TruthfulQA.csv")):
        load_truthfulqa_mc1(tmp_path)
    with pytest.raises(CrispEditError, match=str(tmp_path / "mmlu" / "test")):
        load_mmlu(tmp_path)
    with pytest.raises(CrispEditError, match="unknown benchmark"):
        run_mc_benchmark("hellaswag", None, byte_bpe_tokenizer, root=DATA)


def test_bad_rows_name_file_line_and_field(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,1\nq,a,b,c,d,7\n")
    with pytest.raises(CrispEditError, match=r"x_test.csv, line 3: field 'answer' = 7"):
        load_mmlu(tmp_path)
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Challenge-Test.jsonl").write_text(
        '{"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "B"}\n')
    with pytest.raises(CrispEditError, match=r"ARC-Challenge-Test.jsonl, line 1: bad ARC record"):
        load_arc(tmp_path)
    (tmp_path / "arc" / "ARC-Challenge-Test.jsonl").write_text('\n{"question": \n')
    with pytest.raises(CrispEditError, match=r"ARC-Challenge-Test.jsonl: line 2: invalid JSON at column"):
        load_arc(tmp_path)


def _chain_is_rigable(ids):
    """A bigram chain can force `ids` only if no token needs two different successors."""
    succ = {}
    return all(succ.setdefault(a, b) == b for a, b in zip(ids, ids[1:]))


def test_gsm8k_exact_match_on_a_rigged_model(byte_bpe_tokenizer, biased_llama):
    tok = byte_bpe_tokenizer
    colon = tok("Answer:")["input_ids"][-1]  # every GSM8K prompt ends with "Answer:"

    def chain(reply):
        return [colon] + tok(reply, add_special_tokens=False)["input_ids"]

    for seed in range(50):  # a real test item whose answer (and answer + 1) a bigram chain can produce
        item = sample_items(load_gsm8k(DATA), 1, seed=seed)[0]
        answer = item["answer"].split("####")[1].strip()
        replies = ((f" {answer}\n\n", 1.0), (f" {int(answer) + 1}\n\n", 0.0))
        if all(_chain_is_rigable(chain(r)) for r, _ in replies):
            break
    for reply, expected in replies:
        model = biased_llama(len(tok), seed=0)
        ids = chain(reply)
        model.bigram[ids[:-1], ids[1:]] = 100.0
        res = gsm8k_exact_match(model, tok, limit=1, seed=seed, root=DATA, num_fewshot=0, max_new_tokens=40)
        assert res["exact_match"] == expected, res["items"]
        assert res["items"][0]["reference"] == answer and res["n"] == 1


def test_lm_eval_adapter_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(CrispEditError, match=r"install the `eval` extra"):
        run_lm_eval("some/model", ["arc_challenge"], limit=5)
