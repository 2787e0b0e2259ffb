"""Edit metrics on hand-made cases whose answers are known: tiny Llamas rigged with bigram logit biases."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from crispedit.data.records import EditRequest, LocalityPrompt
from crispedit.errors import CrispEditError
from crispedit.evaluation.edit_metrics import evaluate_edits, teacher_forced_score
from crispedit.evaluation.judges import ExactMatchJudge, HFJudge, OpenAIJudge, PrefixMatchJudge
from crispedit.evaluation.text import (
    contains_match,
    exact_match,
    extract_final_number,
    looping,
    normalize_answer,
    prefix_match,
)

BIG = 100.0


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _rig(model, tok, prompt, continuation, override=False):
    """Make `continuation` follow `prompt` greedily: chain the prompt's last token through its tokens."""
    chain = [tok(prompt)["input_ids"][-1]] + _ids(tok, continuation)
    for a, b in zip(chain, chain[1:]):
        if override:
            model.bigram[a].zero_()
        row = model.bigram[a]
        assert row.abs().sum() == 0 or row[b] == BIG, f"token {a} already rigged to another successor"
        row[b] = BIG


REQUESTS = [
    EditRequest(
        prompt="The Eiffel Tower is located in", target="Shakespeare", case_id="0",
        rephrases=("Eiffel Tower, located in", "The Eiffel Tower is in the city of"),
        locality=(LocalityPrompt("The capital of France is", "Paris"),
                  LocalityPrompt("The mother tongue of Danielle Darrieux", "French")),
    ),
    EditRequest(prompt="Who wrote Hamlet?", target="Danielle Darrieux", case_id="1",
                locality=(LocalityPrompt("Tell me a story"),)),
]


@pytest.fixture
def models(byte_bpe_tokenizer, biased_llama):
    """(edited, base): the same random weights; base facts rigged in both, the edit only in `edited`."""
    tok = byte_bpe_tokenizer
    base = biased_llama(len(tok), seed=0, init_std=0.5)
    edited = biased_llama(len(tok), seed=0, init_std=0.5)
    for name, p in base.state_dict().items():
        assert torch.equal(p, edited.state_dict()[name])
    for m in (base, edited):
        _rig(m, tok, "The capital of France is", " Paris.")
        _rig(m, tok, "The mother tongue of Danielle Darrieux", " French.")
        _rig(m, tok, "Tell me a story", " Planetary days will become shorter.")  # no dataset answer
    _rig(edited, tok, "The Eiffel Tower is located in", " Shakespeare.")  # edit prompt and rephrase 1 (" in")
    _rig(edited, tok, "The Eiffel Tower is in the city of", " Rome.")  # rephrase 2 fails
    _rig(edited, tok, "The mother tongue of Danielle Darrieux", " English.", override=True)  # locality broken
    _rig(edited, tok, "Who wrote Hamlet?", " Danielle Toko")  # first target token right, second wrong
    return edited, base


def test_text_normalisation_cases():
    assert normalize_answer("  The PARIS!! ") == "paris"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("Théâtre  du\tSoleil") == "théâtre du soleil"
    assert normalize_answer("the") == ""
    assert exact_match("Paris.", "paris") and exact_match("the United States", "United States")
    assert not exact_match("Paris, France", "Paris")
    assert prefix_match("Paris, France", "Paris") and prefix_match("paris", "The Paris")
    assert not prefix_match("Parisian food", "Paris")
    assert not prefix_match("", "Paris") and prefix_match("", "the")
    assert contains_match("It is in Paris, France.", "paris") and not contains_match("Parisian", "Paris")
    assert extract_final_number("so 16 - 3 = 13 eggs\n#### 1,300") == "1300"
    assert extract_final_number("She pays $18.00 in total.") == "18"
    assert extract_final_number("It is -4.50") == "-4.5"
    assert extract_final_number("no number") is None


def test_looping_flags_a_repeated_phrase_only():
    assert looping("unmanned aircrafting unmanned aircrafting unmanned aircrafting unmanned")
    assert looping("Paris Paris Paris Paris Paris")
    assert not looping("Paris")
    assert not looping("English is the primary language of Danielle Darrieux and English is spoken")
    assert not looping("a b c a b c", times=3) and looping("a b c a b c a b c")


def test_teacher_forced_score_by_hand():
    s = teacher_forced_score([5, 7, 9], [5, 8, 9], [-0.1, -2.0, -0.3])
    assert s["token_acc"] == pytest.approx(2 / 3) and s["all_correct"] is False
    assert s["target_nll"] == pytest.approx(0.8) and s["n_tokens"] == 3
    assert teacher_forced_score([1], [1], [-0.5])["all_correct"] is True


def test_known_answers_against_a_separate_base(models, byte_bpe_tokenizer):
    edited, base = models
    tok = byte_bpe_tokenizer
    assert len(_ids(tok, " Danielle Darrieux")) == 2  # so R1's token accuracy is exactly 1/2

    class FakeJudge:
        name = "fake_judge"

        def score(self, question, target, generation):
            return 1.0 if "Danielle" in generation else 0.0

    res = evaluate_edits(edited, tok, REQUESTS, base, generated_contexts=("raw",), judge=FakeJudge(),
                         batch_size=3, generation_batch_size=2, show_progress=False)
    agg = res["aggregate"]
    rel, gen, loc = agg["reliability"], agg["generalization"], agg["locality"]
    assert rel["teacher_forced"]["all_correct"] == pytest.approx(0.5)
    assert rel["teacher_forced"]["token_acc"] == pytest.approx((1 + 0.5) / 2)
    assert gen["teacher_forced"]["all_correct"] == pytest.approx(0.5)
    assert gen["teacher_forced"]["n_requests"] == 1
    assert loc["teacher_forced"]["agree_all"] == pytest.approx((0.5 + 1) / 2)
    assert loc["teacher_forced"]["agree_token"] == pytest.approx((0.5 + 1) / 2)
    assert loc["teacher_forced"]["answer_correct"] == pytest.approx(0.5)  # only R0 has answers
    assert loc["teacher_forced"]["answer_correct_base"] == pytest.approx(1.0)
    assert loc["teacher_forced"]["n_requests_with_answer"] == 1

    raw = rel["generated"]["raw"]
    assert raw["exact_match"] == pytest.approx(0.5) and raw["prefix_match"] == pytest.approx(0.5)
    assert raw["fake_judge"] == pytest.approx(0.5) and raw["contains_match"] == pytest.approx(0.5)
    assert res["protocols"]["generated"]["judge"] == "fake_judge"
    # the looping share is the macro mean of each answer's flag, next to the scorers
    per = [float(looping(r["reliability"]["generated"]["raw"]["generation"])) for r in res["per_request"]]
    assert raw["looping"] == pytest.approx(sum(per) / len(per))
    assert gen["generated"]["raw"]["exact_match"] == pytest.approx(0.5)
    lg = loc["generated"]["raw"]
    assert lg["same_as_base"] == pytest.approx(0.75)
    assert lg["answer_exact_match"] == pytest.approx(0.5) and lg["answer_exact_match_base"] == pytest.approx(1.0)

    r0, r1 = res["per_request"]
    assert r0["reliability"]["generated"]["raw"]["generation"] == "Shakespeare"
    assert [g["generated"]["raw"]["generation"] for g in r0["generalization"]] == ["Shakespeare", "Rome"]
    assert r0["locality"][1]["generated"]["raw"]["generation"] == "English"
    assert r0["locality"][1]["generated"]["raw"]["base_generation"] == "French"
    assert r1["reliability"]["generated"]["raw"]["generation"].startswith("Danielle Toko")
    assert r1["reliability"]["teacher_forced"]["token_acc"] == pytest.approx(0.5)
    tf_story = r1["locality"][0]["teacher_forced"]
    assert tf_story["reference"] == "base_continuation"
    assert tf_story["n_tokens"] == len(_ids(tok, " Planetary days will become shorter."))  # stop included
    assert r1["locality"][0]["generated"]["raw"]["base_generation"] == "Planetary days will become shorter"
    assert res["protocols"]["n_prompts"] == {"reliability": 2, "generalization": 2, "locality": 3}
    json.dumps(res)  # the whole result is JSON-serialisable


def test_without_base_locality_is_one_by_definition(models, byte_bpe_tokenizer):
    edited, _ = models
    res = evaluate_edits(edited, byte_bpe_tokenizer, REQUESTS, None, generated_contexts=("raw", "qa"),
                         show_progress=False)
    loc = res["aggregate"]["locality"]
    assert loc["teacher_forced"]["agree_all"] == 1.0 and loc["teacher_forced"]["agree_token"] == 1.0
    assert loc["generated"]["raw"]["same_as_base"] == 1.0 and loc["generated"]["qa"]["same_as_base"] == 1.0
    # against the dataset answer the edited model is still scored (and "base" is the same model)
    assert loc["teacher_forced"]["answer_correct"] == pytest.approx(0.5)
    assert loc["teacher_forced"]["answer_correct_base"] == pytest.approx(0.5)
    assert "same model" in res["protocols"]["base_model"]
    # the edit's reliability does not depend on whether a base was given
    assert res["aggregate"]["reliability"]["teacher_forced"]["all_correct"] == pytest.approx(0.5)
    assert set(res["aggregate"]["reliability"]["generated"]) == {"raw", "qa"}


def test_bad_requests_name_the_record_and_field(models, byte_bpe_tokenizer):
    edited, _ = models
    bad = [REQUESTS[0], EditRequest(prompt="Who?", target="  ", case_id="x")]
    with pytest.raises(CrispEditError, match=r"request 1 \(case_id=x\): field 'target'"):
        evaluate_edits(edited, byte_bpe_tokenizer, bad, show_progress=False)
    bad = [EditRequest(prompt="Who?", target="A", rephrases=("ok", ""))]
    with pytest.raises(CrispEditError, match=r"request 0.*'rephrases\[1\]'"):
        evaluate_edits(edited, byte_bpe_tokenizer, bad, show_progress=False)
    with pytest.raises(CrispEditError, match="chat template"):
        evaluate_edits(edited, byte_bpe_tokenizer, REQUESTS, generated_contexts=("chat",), show_progress=False)


def test_string_judges():
    assert ExactMatchJudge().score("q", "Paris", "paris.") == 1.0
    assert ExactMatchJudge().score("q", "Paris", "Paris, France") == 0.0
    assert PrefixMatchJudge().score("q", "Paris", "Paris, France") == 1.0


def test_hf_judge_reads_yes_or_no_from_the_logits(byte_bpe_tokenizer, biased_llama):
    tok = byte_bpe_tokenizer
    judge_model = biased_llama(len(tok), seed=1)
    judge = HFJudge(judge_model, tok)
    colon = tok("Reply:")["input_ids"][-1]  # the judge prompt (no chat template) ends with "Reply:"
    judge_model.bigram[colon, _ids(tok, " yes")[0]] = BIG
    assert judge.score("Who wrote Hamlet?", "Shakespeare", "Shakespeare") == 1.0
    judge_model.bigram[colon].zero_()
    judge_model.bigram[colon, _ids(tok, " no")[0]] = BIG
    assert judge.score("Who wrote Hamlet?", "Shakespeare", "Marlowe") == 0.0


class _FakeChatServer(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        gen = body["messages"][-1]["content"]
        reply = "Yes." if "Model's answer: Paris" in gen else "no"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_judge_against_a_local_fake_endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("CRISPEDIT_TEST_JUDGE_KEY", "secret-123")
        judge = OpenAIJudge(f"http://127.0.0.1:{server.server_port}/v1", "judge-model",
                            api_key_env="CRISPEDIT_TEST_JUDGE_KEY", timeout=10)
        assert judge.score("Capital of France?", "Paris", "Paris") == 1.0
        assert judge.score("Capital of France?", "Paris", "Rome") == 0.0
        path, headers, body = _FakeChatServer.requests[0]
        assert path == "/v1/chat/completions" and body["model"] == "judge-model" and body["temperature"] == 0
        assert headers.get("Authorization") == "Bearer secret-123"
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(CrispEditError, match="judge endpoint http://127.0.0.1"):
        OpenAIJudge(f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=2).score("q", "a", "b")


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_context_uses_the_template_for_both_protocols(byte_bpe_tokenizer, biased_llama):
    import copy

    tok = copy.deepcopy(byte_bpe_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    model = biased_llama(len(tok), seed=0, init_std=0.5)
    rendered = tok.apply_chat_template([{"role": "user", "content": REQUESTS[0].prompt}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.endswith("<assistant>")
    # every chat prompt ends with "<assistant>": make its last token start "Shakespeare." (no leading space)
    chain = [tok(rendered, add_special_tokens=False)["input_ids"][-1]] + _ids(tok, "Shakespeare.")
    model.bigram[chain[:-1], chain[1:]] = BIG
    reqs = [REQUESTS[0], EditRequest(prompt="Who wrote Hamlet?", target="Marlowe")]
    res = evaluate_edits(model, tok, reqs, teacher_forced_context="chat", generated_contexts=("chat", "raw"),
                         show_progress=False)
    rel = res["aggregate"]["reliability"]
    assert rel["teacher_forced"]["all_correct"] == pytest.approx(0.5)
    assert rel["generated"]["chat"]["exact_match"] == pytest.approx(0.5)
    assert [r["reliability"]["generated"]["chat"]["generation"] for r in res["per_request"]] == ["Shakespeare"] * 2
    assert res["protocols"]["teacher_forced"]["context"] == "chat"
