"""Training variants of an edit: contexts are applied as documented, prefixes are model-written, deterministic, and
never contain a request's rephrase or locality prompt."""

from __future__ import annotations

import copy

import pytest
import torch

from crispedit.data.records import EditRequest, LocalityPrompt
from crispedit.editing.batches import build_training, prefix_pool_size
from crispedit.editing.config import EditConfig
from crispedit.config import TargetEnd
from crispedit.editing.contexts import (drop_leaking_prefixes, generate_prefixes, target_ending, training_sequences,
                                       with_prefix)
from crispedit.formatting import (QA_CONTEXT, PromptFormat, encode_pair, encode_prompt, end_token_id,
                                  resolve_contexts)

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

REQUESTS = [
    EditRequest("The capital of France is", "Rome", rephrases=("France's capital city is",),
                locality=(LocalityPrompt("The capital of Italy is", "Rome"),)),
    EditRequest("Danielle Darrieux speaks", "German", rephrases=("The language of Danielle Darrieux is",)),
]


@pytest.fixture
def chat_tok(byte_bpe_tokenizer):
    tok = copy.deepcopy(byte_bpe_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_named_contexts_are_the_formatting_contexts(chat_tok):
    seqs = training_sequences(chat_tok, REQUESTS, contexts=("raw", "qa", "chat"))
    assert [(s.request, s.variant) for s in seqs] == [(0, "raw"), (0, "qa"), (0, "chat"), (1, "raw"), (1, "qa"),
                                                      (1, "chat")]
    for s in seqs:
        r = REQUESTS[s.request]
        assert s.pair == encode_pair(chat_tok, r.prompt, r.target, PromptFormat(s.variant))
    qa = chat_tok.decode(seqs[1].pair.prompt_ids)
    assert qa == QA_CONTEXT.format(q=REQUESTS[0].prompt)
    chat = chat_tok.decode(seqs[2].pair.prompt_ids)
    assert chat == "<|user|>The capital of France is\n<|assistant|>"
    # the loss is on the target (+ end token) only
    for s in seqs:
        assert s.pair.labels[:len(s.pair.prompt_ids)] == [-100] * len(s.pair.prompt_ids)


def test_prefix_variants_put_a_prefix_before_the_raw_prompt(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer
    pool = ["The tower is tall.", "I went home.", "You know it.", "Because of rain."]
    seqs = training_sequences(tok, REQUESTS, contexts=("raw",), prefixes=pool, prefixes_per_request=2, seed=3)
    assert [s.variant.split(":")[0] for s in seqs] == ["raw", "prefix", "prefix"] * 2
    for s in seqs:
        if s.variant.startswith("prefix"):
            j = int(s.variant.split(":")[1])
            r = REQUESTS[s.request]
            assert s.pair == encode_pair(tok, with_prefix(pool[j], r.prompt), r.target, PromptFormat("raw"))
    per_request = [[s.variant for s in seqs if s.request == i and s.variant != "raw"] for i in range(2)]
    assert all(len(set(v)) == 2 for v in per_request)  # distinct prefixes per request
    again = training_sequences(tok, REQUESTS, contexts=("raw",), prefixes=pool, prefixes_per_request=2, seed=3)
    assert again == seqs
    with pytest.raises(ValueError, match="only 4 are available"):
        training_sequences(tok, REQUESTS, prefixes=pool, prefixes_per_request=5)


def test_prefixes_never_contain_a_rephrase_or_locality_prompt():
    pool = ["It rained.", "He said: France's capital city is.", "We saw that the capital of Italy is big.",
            "Nothing here."]
    assert drop_leaking_prefixes(pool, REQUESTS) == ["It rained.", "Nothing here."]


def test_generated_prefixes_are_deterministic_one_line_sentences(byte_bpe_tokenizer, biased_llama):
    tok = byte_bpe_tokenizer
    model = biased_llama(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = generate_prefixes(model, tok, 6, max_new_tokens=5, seed=1)
    b = generate_prefixes(model, tok, 6, max_new_tokens=5, seed=1)
    assert a == b and len(a) == 6 and len(set(a)) == 6
    assert all("\n" not in p and p[-1] in ".!?" for p in a)
    state = torch.random.get_rng_state()
    generate_prefixes(model, tok, 2, max_new_tokens=3, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is untouched
    seqs, used = build_training(model, tok, REQUESTS, ("raw", "qa"), 2, seed=0)
    assert len(used) <= prefix_pool_size(2) and len(seqs) == 2 * (2 + 2)
    for s in seqs:  # no training text contains a request's rephrase or locality prompt
        text = tok.decode(s.pair.input_ids)
        for r in REQUESTS:
            for q in list(r.rephrases) + [loc.prompt for loc in r.locality]:
                assert q not in text


def test_config_validates_contexts_and_prefixes():
    assert EditConfig(contexts=["qa", "chat"]).contexts == ("qa", "chat")
    with pytest.raises(ValueError, match="unknown training context 'wild'"):
        EditConfig(contexts=("wild",))
    with pytest.raises(ValueError, match="prefixes must be a non-negative integer"):
        EditConfig(prefixes=-1)
    with pytest.raises(ValueError, match="no training sequences"):
        EditConfig(contexts=(), prefixes=0)


def test_resolve_contexts(byte_bpe_tokenizer, chat_tok):
    assert resolve_contexts(("auto",), chat_tok) == ("qa", "chat", "raw")
    assert resolve_contexts(("auto",), byte_bpe_tokenizer) == ("qa", "raw")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        resolve_contexts(("chat",), byte_bpe_tokenizer)
    with pytest.raises(ValueError, match="unknown context 'wild'"):
        resolve_contexts(("wild",), chat_tok)


SUBJECT_REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France", rephrases=("France's capital city is",)),
    EditRequest("Danielle Darrieux speaks", "German", subject="Danielle Darrieux",
                locality=(LocalityPrompt("Michel Rocard speaks", "French"),)),
    EditRequest("The Eiffel Tower is in", "Berlin", subject="Eiffel Tower"),
    EditRequest("Who wrote Hamlet?", "Goethe"),  # no subject: no anchors
]


def test_anchors_swap_the_subject_and_never_hit_a_test_prompt(chat_tok):
    from crispedit.editing.contexts import anchor_prompts, swap_subject

    assert swap_subject("The capital of France is", "France", "Spain") == "The capital of Spain is"
    assert swap_subject("The capital of France is", "Italy", "Spain") is None
    anchors = anchor_prompts(chat_tok, SUBJECT_REQUESTS, contexts=("raw", "qa"), per_request=2, seed=0)
    assert {a.request for a in anchors} == {0, 1, 2}
    for a in anchors:
        r = SUBJECT_REQUESTS[a.request]
        assert r.subject not in a.prompt and a.prompt != r.prompt
        others = [s.subject for s in SUBJECT_REQUESTS if s.subject and s.subject != r.subject]
        assert any(a.prompt == swap_subject(r.prompt, r.subject, o) for o in others)
        assert list(a.prompt_ids) == encode_prompt(chat_tok, a.prompt, PromptFormat(a.context))
    # "Michel Rocard speaks" is request 1's locality prompt: an anchor equal to it is dropped
    reqs = [SUBJECT_REQUESTS[1], EditRequest("Michel Rocard is French", "x", subject="Michel Rocard")]
    texts = {a.prompt for a in anchor_prompts(chat_tok, reqs, per_request=1)}
    assert "Michel Rocard speaks" not in texts


def test_anchor_kl_is_zero_at_the_base_and_holds_the_anchors_closer(byte_bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from crispedit.editing.contexts import anchor_prompts
    from crispedit.editing.engine import AnchorKL, edit
    from crispedit.editing.forward import EditForward
    from crispedit.formatting import EncodedPair

    tok = byte_bpe_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      initializer_range=0.3)
    targets = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    reqs = SUBJECT_REQUESTS[:3]
    anchors = anchor_prompts(tok, reqs, ("raw",), 2, 0)
    pairs = [EncodedPair(list(a.prompt_ids), []) for a in anchors]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double().eval()
    fwd = EditForward(model, targets, pairs, pad_id=tok.pad_token_id)
    kl = AnchorKL(fwd, range(len(pairs)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(kl.step(len(pairs))) == pytest.approx(0.0, abs=1e-12)

    def anchor_kl_after(n_anchors: int) -> float:
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).double().eval()
        # the anchors' effect alone: the change acts at every token (a 3-layer model has little room above
        # the subject's last token for the default positions to converge in 15 epochs)
        ec = EditConfig(method="ft", lr=3e-2, epochs=15, batch_size=3, anchors=n_anchors, anchor_weight=3.0,
                        edit_positions="all")
        res = edit(m, tok, reqs, targets, ec, progress=False)
        assert res.epoch_losses[-1] < 0.5 * res.epoch_losses[0]
        f = EditForward(m, targets, pairs, pad_id=tok.pad_token_id)
        k = AnchorKL.__new__(AnchorKL)
        k.fwd, k.indices, k.top_ids, k.top_logp = f, list(range(len(pairs))), kl.top_ids, kl.top_logp
        k.order, k.carry, k.gen = list(range(len(pairs))), 0.0, torch.Generator()
        with torch.no_grad():
            return float(k.step(len(pairs)))

    assert anchor_kl_after(2) < 0.5 * anchor_kl_after(0)


def test_subject_positions_spell_the_subject_in_every_variant(chat_tok):
    """The positions recorded for each training sequence decode to exactly the subject (not a copy of it in a
    prefix), under raw, qa, chat and a prefix that itself names the subject."""
    req = EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")
    prefix = "Danielle Darrieux was here."
    seqs = training_sequences(chat_tok, [req], contexts=("raw", "qa", "chat"), prefixes=[prefix],
                              prefixes_per_request=1)
    assert [s.variant for s in seqs] == ["raw", "qa", "chat", "prefix:0"]
    for s in seqs:
        pos = s.subject_positions
        assert pos is not None and list(pos) == list(range(pos[0], pos[-1] + 1))
        assert chat_tok.decode([s.pair.input_ids[i] for i in pos]).strip() == "Danielle Darrieux"
        # the part after the subject is the prompt's rest: the match is the prompt's subject, not the prefix's
        assert chat_tok.decode(s.pair.input_ids[pos[-1] + 1:len(s.pair.input_ids) - len(
            [x for x in s.pair.labels if x != -100])]).startswith(" is")
    no_subject = training_sequences(chat_tok, [EditRequest("Who wrote Hamlet?", "Marlowe", subject="Goethe")])
    assert no_subject[0].subject_positions is None


def test_targets_end_as_configured(chat_tok):
    """`EditConfig.target_end`: eos (default) ends every target, prefixed ones too, with the end token of its format
    (EOS raw/QA, end of turn in chat); none: the target tokens alone; turn: the end of turn in chat only; period:
    the end of turn in chat, a period elsewhere. The prompt and subject positions never change."""
    pool = ["Once upon a time.", "In the news today."]
    seqs = {end: training_sequences(chat_tok, REQUESTS, contexts=("raw", "qa", "chat"), prefixes=pool,
                                    prefixes_per_request=1, end=end) for end in TargetEnd}
    assert all(len(v) == 8 for v in seqs.values())
    for i, bare in enumerate(seqs[TargetEnd.NONE]):
        chat = bare.variant == "chat"
        fmt = PromptFormat("chat" if chat else "raw")
        eot = [end_token_id(chat_tok, fmt)]
        for end, want in [(TargetEnd.EOS, bare.pair.target_ids + eot),
                          (TargetEnd.TURN, bare.pair.target_ids + (eot if chat else [])),
                          (TargetEnd.PERIOD, bare.pair.target_ids + eot if chat else None)]:
            s = seqs[end][i]
            assert s.variant == bare.variant and s.pair.prompt_ids == bare.pair.prompt_ids
            assert s.subject_positions == bare.subject_positions
            if want is not None:
                assert s.pair.target_ids == want, (end, s.variant)
        if not chat:  # the period is the sentence's end, written after the target
            text = chat_tok.decode(seqs[TargetEnd.PERIOD][i].pair.target_ids)
            assert text == chat_tok.decode(bare.pair.target_ids) + "."
    assert EditConfig().target_end == TargetEnd.EOS


def test_period_is_not_doubled():
    assert target_ending("Paris", PromptFormat("raw"), "period") == (False, ".")
    assert target_ending("Yes!", PromptFormat("qa"), "period") == (False, "")
    assert target_ending("Yes", PromptFormat("chat"), "period") == (True, "")
    assert target_ending("Yes", PromptFormat("qa"), "turn") == (False, "")


def test_build_training_passes_the_end_token_choice_on(byte_bpe_tokenizer):
    tok = byte_bpe_tokenizer  # no prefixes: the model is not used
    on, _ = build_training(None, tok, REQUESTS, ("raw", "qa"), 0, seed=0)
    off, _ = build_training(None, tok, REQUESTS, ("raw", "qa"), 0, seed=0, end="none")
    assert all(a.pair.target_ids == b.pair.target_ids + [tok.eos_token_id] for a, b in zip(on, off))
