"""Capability metrics of an edited model against its base on held-out text.

Perplexity says how well the model still predicts ordinary text; the mean per-token
KL(p_base || p_edited) of next-token distributions is the Bregman divergence (for softmax outputs)
whose second-order approximation the CrispEdit constraint bounds, so it is the most direct measure of
how far the edit moved the model. Both are computed on text the curvature never saw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from crispedit.evaluation.generation import eval_mode, model_device
from crispedit.formatting import collate

_CHUNK = 1024  # positions per log-softmax chunk (bounds float32 memory at chunk x vocab)


@dataclass(frozen=True)
class CapabilityResult:
    """Token-weighted figures over all predicted positions (not averages of per-sequence figures)."""

    perplexity_base: float
    perplexity_edited: float
    kl_nats_per_token: float
    nll_base: float
    nll_edited: float
    n_sequences: int
    n_tokens: int
    same_model: bool

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["definition"] = (
            "perplexity = exp(total next-token NLL / number of predicted tokens) over the held-out "
            "sequences (position t predicts token t+1; padding excluded); kl_nats_per_token = mean over "
            "the same positions of KL(p_base || p_edited) of the full next-token distributions "
            "(log_softmax in float32, sums in float64)"
            + ("; base model not given: the evaluated model is the base, so KL = 0 and "
               "perplexity_edited = perplexity_base by definition" if self.same_model else "")
        )
        return d


def _check(sequences: Sequence[Sequence[int]]) -> None:
    if not sequences:
        raise ValueError("no held-out sequences")
    for i, s in enumerate(sequences):
        if len(s) < 2:
            raise ValueError(f"held-out sequence {i} has {len(s)} token(s); at least 2 are needed")


def _batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _valid_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at predicting positions and the (N,) tokens they predict, padding excluded."""
    dev = model_device(model)
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return logits[:, :-1][keep], ids[:, 1:][keep]


LogitsFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def capability_pass(base_logits: LogitsFn, edited_logits: LogitsFn | None, sequences: Sequence[Sequence[int]],
                    batch_size: int = 4, show_progress: bool = False, pad_id: int = 0) -> CapabilityResult:
    """Perplexities and KL(p_base || p_edited) from two functions batch → (logits [N, V], targets [N]) at the
    predicting positions; `edited_logits=None` scores the base alone. (`capability_metrics` passes two models;
    the KL budget passes one model whose edited weights are switched in and out.)"""
    sequences = getattr(sequences, "sequences", sequences)
    _check(sequences)
    same = edited_logits is None
    nll_b = nll_e = kl = 0.0
    n = 0
    for idx in tqdm(_batches(sequences, batch_size), desc="capability", disable=not show_progress, leave=False):
        batch = collate([list(sequences[i]) for i in idx], pad_id, padding_side="right")
        lb_all, tgt = base_logits(batch)
        le_all = None if same else edited_logits(batch)[0]
        for s in range(0, tgt.shape[0], _CHUNK):
            t = tgt[s:s + _CHUNK]
            lb = torch.log_softmax(lb_all[s:s + _CHUNK].float(), -1)
            nll_b += -lb.gather(-1, t[:, None]).double().sum().item()
            if not same:
                le = torch.log_softmax(le_all[s:s + _CHUNK].float().to(lb.device), -1)
                nll_e += -le.gather(-1, t[:, None].to(le.device)).double().sum().item()
                kl += (lb.exp() * (lb - le)).sum(-1).double().sum().item()
        n += int(tgt.shape[0])
    if same:
        nll_e = nll_b
    return CapabilityResult(
        perplexity_base=math.exp(nll_b / n), perplexity_edited=math.exp(nll_e / n),
        kl_nats_per_token=kl / n, nll_base=nll_b / n, nll_edited=nll_e / n,
        n_sequences=len(sequences), n_tokens=n, same_model=same,
    )


def capability_metrics(base_model, edited_model, sequences: Sequence[Sequence[int]], batch_size: int = 4,
                       show_progress: bool = False, pad_id: int = 0) -> CapabilityResult:
    """Perplexity of both models and KL(p_base || p_edited) in one pass per batch.

    `edited_model=None` (or the same object as `base_model`) evaluates the base alone: KL = 0 and
    perplexity_edited = perplexity_base by definition.
    """
    same = edited_model is None or edited_model is base_model
    with eval_mode(base_model, None if same else edited_model):
        return capability_pass(lambda b: _valid_logits(base_model, b),
                               None if same else (lambda b: _valid_logits(edited_model, b)),
                               sequences, batch_size, show_progress, pad_id)


def perplexity(model, sequences: Sequence[Sequence[int]], batch_size: int = 4, show_progress: bool = False) -> float:
    """exp(mean next-token NLL per predicted token) over `sequences` (token-weighted, padding excluded)."""
    return capability_metrics(model, None, sequences, batch_size, show_progress).perplexity_base


def kl_divergence(base_model, edited_model, sequences: Sequence[Sequence[int]], batch_size: int = 4,
                  show_progress: bool = False) -> float:
    """Mean over predicted positions of KL(p_base || p_edited) of next-token distributions, in nats/token."""
    if edited_model is base_model:
        return 0.0
    return capability_metrics(base_model, edited_model, sequences, batch_size, show_progress).kl_nats_per_token
