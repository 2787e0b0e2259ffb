"""The end-to-end `evaluate` call, report round trip, Markdown, comparison table and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crispedit.data.records import EditRequest, LocalityPrompt
from crispedit.errors import CrispEditError
from crispedit.evaluation import (
    EvalConfig,
    EvalReport,
    build_report,
    compare_reports,
    evaluate,
    load_report,
    plot_loss_curves,
    plot_tradeoff,
    write_report,
)

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "benchmarks").resolve()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REQUESTS = [
    EditRequest(prompt="The Eiffel Tower is located in", target="Rome", case_id="a",
                rephrases=("Eiffel Tower, located in",),
                locality=(LocalityPrompt("The capital of France is", "Paris"),)),
    EditRequest(prompt="Who wrote Hamlet?", target="Shakespeare", case_id="b",
                locality=(LocalityPrompt("Tell me a story"),)),
]


def _heldout(tok):
    texts = ["The capital of France is Paris.", "Danielle Darrieux speaks French and English.",
             "Planetary days will become shorter.", "The Colosseum is in the city of Rome."]
    return [tok(t)["input_ids"] for t in texts]


@pytest.fixture
def models(byte_bpe_tokenizer, biased_llama):
    tok = byte_bpe_tokenizer
    base = biased_llama(len(tok), seed=0, init_std=0.5)
    edited = biased_llama(len(tok), seed=0, init_std=0.5)
    chain = [tok("The Eiffel Tower is located in")["input_ids"][-1]]
    chain += tok(" Rome.", add_special_tokens=False)["input_ids"]
    edited.bigram[chain[:-1], chain[1:]] = 100.0
    return edited, base


def _config(**kw):
    base = dict(generated_contexts=("raw",), max_new_tokens=8,
                benchmarks=("arc", "truthfulqa") if DATA.is_dir() else (),
                benchmark_limit=2, benchmarks_root=str(DATA), batch_size=4, show_progress=False)
    return EvalConfig(**(base | kw))


def test_evaluate_fills_the_summary_consistently(models, byte_bpe_tokenizer):
    edited, base = models
    tok = byte_bpe_tokenizer
    rep = evaluate(edited, base, tok, REQUESTS, _heldout(tok), _config(), run_config={"method": "ft", "gamma": None})
    s = rep.summary
    agg = rep.metrics["edit"]["aggregate"]
    for key in ("reliability_gen_raw", "generalization_gen_raw", "locality_gen_raw", "locality_gen_raw_first_token",
                "reliability_gen_raw_contains", "reliability_tf", "generalization_tf", "locality_tf",
                "perplexity_base", "perplexity_edited", "kl_nats_per_token"):
        assert key in s and s[key] is not None, key
        assert key in rep.summary_protocol
    # generated metrics come first in the summary, teacher-forced ones after the capability figures
    keys = list(s)
    assert keys.index("reliability_gen_raw") < keys.index("perplexity_base") < keys.index("reliability_tf")
    assert s["reliability_tf"] == agg["reliability"]["teacher_forced"]["all_correct"]
    assert s["reliability_tf"] == pytest.approx(0.5)  # the edit took on request a only
    assert s["generalization_tf"] == pytest.approx(1.0)  # request a's rephrase ends like its prompt
    assert s["locality_tf"] == agg["locality"]["teacher_forced"]["agree_all"]
    assert s["reliability_gen_raw"] == agg["reliability"]["generated"]["raw"]["exact_match"]
    assert s["reliability_gen_raw_contains"] == agg["reliability"]["generated"]["raw"]["contains_match"]
    assert s["locality_gen_raw_first_token"] == agg["locality"]["generated"]["raw"]["first_token_same"]
    assert s["kl_nats_per_token"] > 0 and s["perplexity_edited"] != s["perplexity_base"]
    assert s["perplexity_increase_pct"] == pytest.approx(100 * (s["perplexity_edited"] / s["perplexity_base"] - 1))
    assert rep.eval_config["generated_contexts"] == ["raw"] and rep.config["method"] == "ft"
    assert rep.meta["wall_time_s"]["total"] > 0 and rep.meta["base_model_given"] is True
    if DATA.is_dir():
        assert rep.metrics["benchmarks"]["arc"]["n"] == 2 and "arc_acc" in s and "truthfulqa_acc_norm" in s
    json.dumps(rep.to_json())


def test_evaluating_the_base_itself_is_explicit(models, byte_bpe_tokenizer):
    _, base = models
    tok = byte_bpe_tokenizer
    rep = evaluate(base, None, tok, REQUESTS, _heldout(tok), _config(benchmarks=()))
    s = rep.summary
    assert s["locality_tf"] == 1.0 and s["locality_gen_raw"] == 1.0 and s["locality_gen_raw_first_token"] == 1.0
    assert s["kl_nats_per_token"] == 0.0 and s["perplexity_edited"] == s["perplexity_base"]
    assert "by definition" in rep.metrics["capability"]["definition"]
    assert "same model" in rep.metrics["edit"]["protocols"]["base_model"]
    assert rep.meta["base_model_given"] is False


def test_corpus_objects_are_accepted_and_described(models, byte_bpe_tokenizer):
    edited, base = models
    tok = byte_bpe_tokenizer

    class Corpus:
        sequences = _heldout(tok)

        def describe(self):
            return {"source": "test", "n": 4}

    rep = evaluate(edited, base, tok, [], Corpus(), _config(benchmarks=()))
    assert rep.metrics["capability"]["corpus"] == {"source": "test", "n": 4}
    assert rep.summary["reliability_tf"] is None and rep.metrics["edit"] is None


def _fake_report(method, gamma, rel, ppl_e, kl) -> EvalReport:
    edit = {"aggregate": {"reliability": {"teacher_forced": {"all_correct": rel, "token_acc": rel}},
                          "generalization": {"teacher_forced": {"all_correct": rel / 2}},
                          "locality": {"teacher_forced": {"agree_all": 0.9, "agree_token": 0.95}}},
            "protocols": {"n_requests": 100, "generated": {"contexts": [], "scorers": ["exact_match"]}}}
    cap = {"perplexity_base": 10.0, "perplexity_edited": ppl_e, "kl_nats_per_token": kl}
    return build_report(edit=edit, capability=cap, config={"method": method, "gamma": gamma})


def test_report_round_trip_markdown_and_comparison(tmp_path):
    rep = _fake_report("crispedit", 0.99, 0.8, 10.5, 0.01)
    js, md = write_report(rep, tmp_path / "runs" / "crisp.json")
    assert js.exists() and md == tmp_path / "runs" / "crisp.md" and md.exists()
    raw = json.loads(js.read_text())
    assert list(raw)[:3] == ["format", "version", "summary"]
    assert raw["summary"]["perplexity_increase_pct"] == pytest.approx(5.0)
    back = load_report(js)
    assert back == rep and back.source == str(js)
    text = md.read_text()
    assert "# Evaluation: crispedit γ=0.99" in text and "| reliability_tf | 0.800 |" in text
    assert "| kl_nats_per_token | 0.01 |" in text and "**method**" in text

    other = [_fake_report("ft", None, 1.0, 30.0, 0.5), _fake_report("adam-nscl", None, 0.9, 12.0, 0.05)]
    paths = [js] + [write_report(r, tmp_path / f"r{i}.json")[0] for i, r in enumerate(other)]
    table = compare_reports(paths)
    header = table.splitlines()[0]
    for label in ("crispedit γ=0.99", "ft", "adam-nscl"):
        assert label in header
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(rows)[:4] == ["perplexity_base", "perplexity_edited", "perplexity_increase_pct", "kl_nats_per_token"]
    assert "| 0.800 | 1.000 | 0.900 |" in rows["reliability_tf"]
    assert "+200.0%" in rows["perplexity_increase_pct"]
    # duplicate labels are told apart by file name
    dup = compare_reports([js, js])
    assert "crispedit γ=0.99 (crisp)" in dup.splitlines()[0]


def test_bad_report_files_are_clear_errors(tmp_path):
    with pytest.raises(CrispEditError, match="report not found"):
        load_report(tmp_path / "none.json")
    (tmp_path / "x.json").write_text('{"summary": {}}')
    with pytest.raises(CrispEditError, match="x.json: not a crispedit evaluation report"):
        load_report(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{oops")
    with pytest.raises(CrispEditError, match="y.json: not valid JSON"):
        load_report(tmp_path / "y.json")


def test_plots_are_written(tmp_path):
    reps = [_fake_report("crispedit", g, 0.7 + g / 10, 10 + 5 * g, g / 10) for g in (0.9, 0.99, 0.999)]
    reps.append(_fake_report("ft", None, 1.0, 30.0, 0.5))
    out = plot_tradeoff(reps, tmp_path / "plots" / "tradeoff.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    out = plot_tradeoff(reps, tmp_path / "grid.png", y_key=("reliability_tf", "locality_tf"))
    assert out.read_bytes()[:8] == PNG_MAGIC
    out = plot_loss_curves({"crispedit": [2.0, 1.0, 0.5], "ft": [2.0, 0.3, 0.01]}, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    curves = [[float(torch.rand(1)) + 1 / (t + 1) for t in range(10)] for _ in range(12)]
    out = plot_loss_curves(curves, tmp_path / "per_edit.png", xlabel="step")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("**/*.tmp"))
