"""Batched greedy generation: equals one-by-one and an uncached oracle; stops where it should."""

from __future__ import annotations

import pytest
import torch

from crispedit.evaluation.generation import generate_greedy, generate_greedy_ids
from crispedit.evaluation.text import contains_stop, truncate_at_stop

PROMPTS = [
    "The",
    "The Eiffel Tower is located in",
    "Q: Who wrote Hamlet?\nA:",
    "The mother tongue of Danielle Darrieux is",
    "Paris",
    "Please answer the question:\n\nQ: What is the capital of France?\nA:",
    "The language of Toko Yasuda is",
]


def _oracle_greedy(model, prompt_ids, n):
    """Greedy decoding without cache or padding: a full forward pass over the sequence at every step."""
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt_ids):]


def _chain(model, token_ids, strength=100.0):
    """Rig the model so that each token of `token_ids` is followed by the next one."""
    for a, b in zip(token_ids, token_ids[1:]):
        row = model.bigram[a]
        assert row.abs().sum() == 0 or row[b] == strength, "chain reuses a token with another successor"
        model.bigram[a, b] = strength


@pytest.fixture
def model(byte_bpe_tokenizer, biased_llama):
    # A larger init spreads the logits, so float noise cannot flip an argmax between batch layouts.
    return biased_llama(len(byte_bpe_tokenizer), seed=0, init_std=0.5)


def test_batched_equals_one_by_one_and_uncached_oracle(model, byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(x) for x in ids}) >= 5  # really different lengths -> real left padding
    kw = dict(max_new_tokens=12, stop_strings=(), stop_ids=[])
    batched = generate_greedy_ids(model, tok, ids, batch_size=4, **kw)
    single = [generate_greedy_ids(model, tok, [x], batch_size=1, **kw)[0] for x in ids]
    assert batched == single
    assert all(len(r) == 12 for r in batched)
    for x, got in zip(ids, batched):
        assert got == _oracle_greedy(model, x, 12)
    # with the default stops (newline, period, EOS) the texts agree too
    assert generate_greedy(model, tok, ids, batch_size=3) == [generate_greedy(model, tok, [x])[0] for x in ids]


def test_stops_at_period_newline_and_eos(model, byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    eos = tok.eos_token_id
    prompts = {
        "period": ("The Eiffel Tower is located in", " Paris. Hello"),
        "newline": ("Q: Who wrote Hamlet?\nA:", " Shakespeare\n"),
        "lead_nl": ("The capital of France is", "\nParis\n"),
    }
    for prompt, cont in prompts.values():
        p = tok(prompt)["input_ids"]
        _chain(model, [p[-1]] + tok(cont, add_special_tokens=False)["input_ids"])
    p_eos = tok("Toko Yasuda speaks")["input_ids"]
    c_eos = tok(" English", add_special_tokens=False)["input_ids"]
    _chain(model, [p_eos[-1]] + c_eos + [eos])

    order = ["period", "newline", "lead_nl"]
    ids = [tok(prompts[k][0])["input_ids"] for k in order] + [p_eos]
    texts = generate_greedy(model, tok, ids, batch_size=4)
    assert texts == ["Paris", "Shakespeare", "Paris", "English"]
    raw = generate_greedy_ids(model, tok, ids, batch_size=4)
    # the EOS row ends before EOS (or just after it with include_stop); no padding is left on any row
    assert raw[3] == c_eos
    assert generate_greedy_ids(model, tok, [p_eos], include_stop=True)[0] == c_eos + [eos]
    assert tok.decode(raw[0]).startswith(" Paris.") and len(raw[0]) <= len(tok(" Paris.")["input_ids"]) + 1
    # the batch still equals one-by-one when rows stop at different steps
    assert raw == [generate_greedy_ids(model, tok, [x])[0] for x in ids]


def test_max_new_tokens_bounds_the_answer(model, byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    out = generate_greedy_ids(model, tok, ids, max_new_tokens=3, stop_strings=(), stop_ids=[])
    assert all(len(r) == 3 for r in out)
    assert generate_greedy(model, tok, []) == []
    with pytest.raises(ValueError, match="empty prompt"):
        generate_greedy(model, tok, [[]])


def test_stop_string_helpers():
    assert truncate_at_stop(" Paris. It is", ("\n", ".")) == "Paris"
    assert truncate_at_stop("\n\nParis\nRome", ("\n", ".")) == "Paris"
    assert truncate_at_stop("no stop here", ("\n", ".")) == "no stop here"
    assert truncate_at_stop("3 apples\n\nQuestion: x", ("\n\n", "Question:")) == "3 apples"
    assert not contains_stop("\n\n", ("\n",))  # leading whitespace is not a stop
    assert contains_stop(" a.", (".",))
