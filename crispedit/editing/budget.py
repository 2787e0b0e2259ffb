"""A capability budget with a certificate: after an edit, KL(base ‖ edited) on held-out text must be ≤ ε.

The paper's problem is min L_edit(θ) s.t. d(L_cap(θ), L_cap(θ₀)) ≤ ε with d a Bregman divergence, whose value for
softmax outputs is the KL divergence of the next-token distributions. The projection keeps each step in
low-curvature directions, but the *amount* of movement is set by lr × steps, which is not a constraint. This module
makes ε explicit: it measures the mean per-token KL(p_base ‖ p_edited) on held-out capability text (text the
curvature never saw) and, when it exceeds ε, backs off along the edit's own path, W₀ + α·ΔW with α ∈ (0, 1], to the
largest α found whose measured KL is ≤ ε. The returned record (the certificate) holds ε, the final α, the KL
measured on exactly the final weights, and every evaluation made; it goes into the delta's record.

Near θ₀ the divergence is quadratic, KL(α) ≈ c·α², so each new α comes from a power law fitted to the last two
measurements (the quadratic guess first); a handful of forward passes over the held-out text settle it. The
certificate is a measurement on that text, not a bound for all inputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from crispedit.editing.delta import EditDelta, materialize
from crispedit.evaluation.capability import _valid_logits, capability_pass
from crispedit.evaluation.generation import eval_mode
from crispedit.models.targets import target_weight


def validate_max_kl(value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"max_kl must be a positive number of nats per token, got {value}")
    return v


def _set_scale(model: nn.Module, base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], alpha: float
               ) -> None:
    with torch.no_grad():
        for n, b in base.items():
            target_weight(model, n).copy_(materialize(b, alpha * deltas[n].to(b.device)))


def measure_kl(model: nn.Module, base: dict[str, torch.Tensor], edited: dict[str, torch.Tensor],
               sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """KL(base ‖ edited) per token and both perplexities on `sequences`, switching the target weights of one
    model between `base` and `edited` (full weight matrices) batch by batch; leaves `edited` in the model."""

    def logits(weights):
        def fn(batch):
            with torch.no_grad():
                for n, w in weights.items():
                    target_weight(model, n).copy_(w)
            return _valid_logits(model, batch)
        return fn

    with eval_mode(model):
        res = capability_pass(logits(base), logits(edited), sequences, batch_size, False, pad_id)
    return {"kl_nats_per_token": res.kl_nats_per_token, "perplexity_base": res.perplexity_base,
            "perplexity_edited": res.perplexity_edited, "n_tokens": res.n_tokens}


def search_scale(kl_at: Callable[[float], float], kl1: float, eps: float, max_evaluations: int = 6,
                 target: float = 0.97) -> tuple[float, float]:
    """The largest scale α found in (0, 1] whose KL `kl_at(α)` is ≤ `eps`, and that KL; (0, 0) if none.

    `kl1` is the KL at α = 1 (one evaluation already made). Each new α comes from a power law KL = c·α^p through
    the two measurements that bracket the budget, aimed at `target`·ε: near the base KL is quadratic and one
    guess usually suffices. A KL that rises like a cliff (several edited layers, docs/scale.md) fits a power above 4; such
    a fit aims far too low again and again, so the bracket is halved instead. Stops at `max_evaluations`
    evaluations in all, or once the best α's KL is ≥ 0.8·ε."""
    best = (1.0, kl1) if kl1 <= eps else (0.0, 0.0)
    lo, hi = (0.0, 0.0), (1.0, kl1)  # (α, KL): lo meets the budget, hi breaks it
    evaluations = 1
    while kl1 > eps and evaluations < max_evaluations and best[1] < 0.8 * eps:
        (a0, k0), (a1, k1) = lo, hi
        # power law through the bracketing measurements (quadratic while the lower end is α = 0)
        p = math.log(k1 / k0) / math.log(a1 / a0) if a0 > 0 and k0 > 0 and k1 > k0 else 2.0
        if p > 4.0:
            alpha = 0.5 * (a0 + a1)
        else:
            alpha = a1 * (target * eps / k1) ** (1.0 / max(p, 1.0))
            alpha = min(max(alpha, a0 + 0.05 * (a1 - a0)), a1 - 0.05 * (a1 - a0))
        kl = kl_at(alpha)
        evaluations += 1
        if kl <= eps:
            lo = (alpha, kl)
            best = max(best, lo)
        else:
            hi = (alpha, kl)
    return best


def enforce_kl_budget(model: nn.Module, delta: EditDelta, sequences: Sequence[Sequence[int]], max_kl: float,
                      pad_id: int = 0, batch_size: int = 8, max_evaluations: int = 6, target: float = 0.97,
                      ) -> dict[str, Any]:
    """Scale the applied edit `delta` (already in `model`) back until the held-out KL is ≤ `max_kl`.

    On return `model` holds base + α·ΔW and `delta` is replaced in place by the scaled delta (bit-exact apply and
    revert as before). Returns the certificate (also stored in `delta.record["kl_budget"]`). Aims for a KL of
    `target`·ε, so that the final α is not needlessly small; if no α within `max_evaluations` meets ε, the edit
    is removed (α = 0, KL = 0) and the certificate says so (`edit_removed`).
    """
    eps = validate_max_kl(max_kl)
    targets = delta.targets
    delta.revert(model)
    base = {n: target_weight(model, n).detach().clone() for n in targets}
    deltas = {n: d.to(base[n].device) for n, d in delta.deltas.items()}
    evals: list[dict[str, float]] = []

    def kl_at(alpha: float) -> float:
        _set_scale(model, base, deltas, alpha)
        weights = {n: target_weight(model, n).detach().clone() for n in targets}
        m = measure_kl(model, base, weights, sequences, pad_id, batch_size)
        evals.append({"scale": alpha, **m})
        return m["kl_nats_per_token"]

    kl1 = kl_at(1.0)
    best = search_scale(kl_at, kl1, eps, max_evaluations, target)
    alpha, kl = best
    # base + α·ΔW is materialised exactly as it was when measured, so the certificate is for these very weights
    scaled = {n: alpha * deltas[n].float() for n in targets}
    cert = {"max_kl": eps, "scale": alpha, "kl_nats_per_token": kl, "kl_unscaled": kl1,
            "held_out_tokens": evals[0]["n_tokens"], "evaluations": evals, "satisfied": kl <= eps,
            "edit_removed": alpha == 0.0,
            "definition": "mean per-token KL(p_base || p_edited) of next-token distributions on held-out text, "
                          "measured on exactly the final weights base + scale * delta"}
    with torch.no_grad():
        for n in targets:
            target_weight(model, n).copy_(base[n])
    record = dict(delta.record, kl_budget=cert)
    new = EditDelta.from_base(model, base, scaled, record)
    delta.deltas, delta.fixups, delta.record = new.deltas, new.fixups, new.record
    return cert
