"""The KL budget: an over-budget edit is backed off along its own path until the held-out KL measured on the final
weights is ≤ ε, the certificate is in the delta record, and the delta still applies/reverts bit-exactly. Also
`Curvature.select`: a subset of a cache equals a cache collected for the subset alone."""

from __future__ import annotations

import math

import pytest
import torch

from crispedit.editing.budget import enforce_kl_budget, measure_kl, validate_max_kl
from tests.test_editing import CAPABILITY, REQUESTS, TARGETS, run, setup, weights  # noqa: F401

HELDOUT_TEXTS = ["The tower is in Paris. The capital of France is Paris.", "Who wrote Hamlet? Shakespeare did.",
                 "The mother tongue of Toko Yasuda is English.", "Planetary days will become shorter, not longer."]


def _heldout(tok):
    return [tok(t)["input_ids"] for t in HELDOUT_TEXTS]


def test_over_budget_edit_is_backed_off_until_the_measured_kl_fits(setup):
    model, tok, cur = setup
    base = weights(model)
    res = run(model, tok, cur, method="ft", lr=5e-2, epochs=30)
    held = _heldout(tok)
    unscaled = {n: d.clone() for n, d in res.delta.deltas.items()}
    kl_full = measure_kl(model, base, weights(model), held, pad_id=1)["kl_nats_per_token"]
    assert kl_full > 0.05  # an FT edit at a large lr moves the model a lot on this text
    eps = kl_full / 10
    cert = enforce_kl_budget(model, res.delta, held, eps, pad_id=1)
    assert cert["satisfied"] and 0 < cert["scale"] < 1 and cert["kl_nats_per_token"] <= eps
    assert cert["kl_unscaled"] == pytest.approx(kl_full, rel=1e-6)
    assert res.delta.record["kl_budget"] == cert
    # the certificate was measured on exactly the weights the model now holds
    now = weights(model)
    again = measure_kl(model, base, now, held, pad_id=1)["kl_nats_per_token"]
    assert again == cert["kl_nats_per_token"]
    for n in TARGETS:  # the edit was scaled along its own path
        assert torch.equal(res.delta.deltas[n], cert["scale"] * unscaled[n])
        assert torch.allclose(now[n] - base[n], cert["scale"] * unscaled[n], atol=1e-6)
    # the scaled delta is a normal delta: revert is bit-exact, and apply gives back the same weights
    res.delta.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)
    res.delta.apply(model)
    assert all(torch.equal(weights(model)[n], now[n]) for n in TARGETS)
    res.delta.revert(model)


def test_within_budget_edit_is_left_alone(setup):
    model, tok, cur = setup
    res = run(model, tok, cur, method="crispedit", gamma=0.9)
    edited = weights(model)
    before = {n: d.clone() for n, d in res.delta.deltas.items()}
    cert = enforce_kl_budget(model, res.delta, _heldout(tok), 1e3, pad_id=1)
    assert cert["scale"] == 1.0 and len(cert["evaluations"]) == 1
    assert all(torch.equal(res.delta.deltas[n], before[n]) for n in TARGETS)
    assert all(torch.equal(weights(model)[n], edited[n]) for n in TARGETS)
    res.delta.revert(model)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "x"])
def test_budget_must_be_a_positive_number(bad):
    with pytest.raises(ValueError):
        validate_max_kl(bad)


def test_curvature_subset_equals_the_subset_collected_alone(setup):
    from crispedit.curvature.api import Curvature, CurvatureConfig

    model, tok, cur = setup
    sub = cur.select([TARGETS[1]], model=model)
    seqs = [tok(t)["input_ids"] for t in CAPABILITY] * 4
    alone = Curvature.compute(model, [TARGETS[1]], seqs, {"source": "test"},
                              CurvatureConfig(labels="empirical", sink_tokens=0), pad_id=1, progress=False)
    both = Curvature.compute(model, TARGETS, seqs, {"source": "test"},
                             CurvatureConfig(labels="empirical", sink_tokens=0), pad_id=1, progress=False)
    picked = both.select([TARGETS[1]], model=model)
    assert sub.targets == [TARGETS[1]] and picked.targets == [TARGETS[1]]
    assert torch.allclose(picked.stats[TARGETS[1]].A, alone.stats[TARGETS[1]].A, rtol=1e-12)
    assert torch.allclose(picked.stats[TARGETS[1]].S, alone.stats[TARGETS[1]].S, rtol=1e-10)
    m1, m2 = picked.masks(0.9)[TARGETS[1]], alone.masks(0.9)[TARGETS[1]]
    assert torch.equal(m1, m2)
    picked.check_model(model)  # the subset's fingerprint is the subset's
    with pytest.raises(Exception, match="does not cover"):
        cur.select(["model.layers.5.mlp.down_proj"])


def test_scale_search_needs_one_guess_for_a_quadratic_kl_and_halves_the_bracket_at_a_cliff():
    from crispedit.editing.budget import search_scale

    def counted(f):
        calls = []

        def g(a):
            calls.append(a)
            return f(a)
        return g, calls

    quad, calls = counted(lambda a: 0.3 * a * a)
    alpha, kl = search_scale(quad, 0.3, 0.1)
    assert len(calls) == 1 and 0.8 * 0.1 <= kl <= 0.1 and alpha == pytest.approx((0.097 / 0.3) ** 0.5)

    # flat, then a wall: the KL of several edited layers backed off along their path (README)
    def cliff(a):
        return 0.02 * a * a if a <= 0.7 else 0.0098 + 5 * (a - 0.7)

    for eps in (0.05, 0.2, 0.5):
        crossing = 0.7 + (eps - 0.0098) / 5
        f, calls = counted(cliff)
        alpha, kl = search_scale(f, cliff(1.0), eps, max_evaluations=6)
        assert kl <= eps and kl == cliff(alpha) and len(calls) <= 5
        assert crossing - 0.03 <= alpha <= crossing  # a power law capped at α⁴ alone ends at 0.51 for ε 0.05

    never, _ = counted(lambda a: 1.0 + a)
    assert search_scale(never, 2.0, 0.1, max_evaluations=4) == (0.0, 0.0)


def test_a_large_batch_without_a_budget_gets_a_one_line_warning():
    from crispedit.editing.config import EditConfig
    from crispedit.editing.run import LARGE_BATCH, scale_warning

    note = scale_warning(LARGE_BATCH, EditConfig())
    assert note is not None and "\n" not in note and "--max-kl" in note and f"{LARGE_BATCH} requests" in note
    # a small batch, a budget already given, or the sequential editor (chunks of 100 by default): no warning
    assert scale_warning(LARGE_BATCH - 1, EditConfig()) is None
    assert scale_warning(1000, EditConfig(max_kl=0.1)) is None
    assert scale_warning(1000, EditConfig(), sequential=True) is None
    # a projected method keyed on the subject (`auto` below AUTO_ALL_FROM requests) is told of every-token training
    # (measured at 300 and 1,000 edits); from AUTO_ALL_FROM on `auto` already trains at every token
    from crispedit.config import AUTO_ALL_FROM

    assert "--edit-positions all" in note and f"from {AUTO_ALL_FROM} requests on" in note
    assert "--edit-positions" not in scale_warning(AUTO_ALL_FROM, EditConfig())
    assert "--edit-positions all" in scale_warning(AUTO_ALL_FROM, EditConfig(edit_positions="subject-last"))
    other = scale_warning(LARGE_BATCH, EditConfig(edit_positions="all"))
    assert other is not None and "--edit-positions" not in other
    assert "--edit-positions" not in scale_warning(LARGE_BATCH, EditConfig(method="ft"))


def test_an_unconstrained_method_keyed_on_the_subject_gets_a_one_line_warning():
    """FT, LoRA and LocBF-FT trained at the subject's last token act unchecked at every other token afterwards
    (LoRA at 100 CounterFact edits: KL 8-10 nats/token); the projected methods, `--edit-positions all` and the
    default `auto` (every token for these methods) are not warned about."""
    from crispedit.editing.config import EditConfig
    from crispedit.editing.run import positions_warning

    for method in ("ft", "lora", "locbf-ft"):
        note = positions_warning(EditConfig(method=method, edit_positions="subject-last"), 100)
        assert note is not None and "\n" not in note and "--edit-positions auto or all" in note and method in note
        assert positions_warning(EditConfig(method=method, edit_positions="subject"), 100) is not None
        assert positions_warning(EditConfig(method=method, edit_positions="all"), 100) is None
        assert positions_warning(EditConfig(method=method), 100) is None  # auto: every token for these methods
    for method in ("crispedit", "adam-nscl"):
        assert positions_warning(EditConfig(method=method), 100) is None
        assert positions_warning(EditConfig(method=method, edit_positions="subject-last"), 100) is None
