"""Capability replay: the capability constraint itself, measured on text, as a term of the edit loss.

The paper's problem is min L_edit(θ) s.t. KL-type divergence of the capability loss ≤ ε, and CrispEdit enforces it
through the K-FAC model of that divergence (the projection). At a few hundred edits the model stops being accurate:
the measured KL is about 6× the K-FAC quadratic form, from three compounding causes (curvature from a finite sample,
layers acting together while K-FAC is block-diagonal across them, and edits long enough to leave the quadratic
range; docs/scale.md, "300 edits"). None of the three touches the divergence measured on real text with the real model,
so this term adds it: each step, λ · mean per-token KL(p_base ‖ p_edited) of next-token distributions over a few
chunks of capability text, its gradient projected like the edit loss's (the Lagrangian of the paper's problem, with
a fixed multiplier λ, the constraint estimated stochastically).

The chunks come from the curvature corpus's *training* split (never the held-out split that evaluation and the KL
budget measure on). The base model's distribution is stored as its top-k tokens plus one "any other token"
outcome per position, recorded before editing; the term is the exact KL of those coarsened distributions, so it is
zero at the base weights and never negative (the coarsening can only lower it: KL of a coarsening ≤ KL).
The replay forward is the plain one (every weight, every position): there the change acts at every token, as it
does when the edited model is used.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from crispedit.formatting import collate

TOP_K = 32


def with_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probabilities of k tokens → [..., k + 1] with the log-probability of all other tokens."""
    rest = torch.log1p(-top_logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))
    return torch.cat([top_logp, rest], -1)


def coarse_kl(ref_logp: torch.Tensor, top_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, KL(ref ‖ edited) of the distributions coarsened to the rows' top-k tokens + the rest.
    `ref_logp` [N, k + 1] (from `with_rest`), `top_ids` [N, k], `logits` [N, vocab] of the edited model."""
    if logits.dtype != torch.float64:
        logits = logits.float()  # the normaliser over the vocabulary in float32, the k + 1 outcomes in float64
    logp_top = logits.gather(-1, top_ids).double() - torch.logsumexp(logits, -1, keepdim=True).double()
    mine = with_rest(logp_top)
    ref = ref_logp.double()
    return (ref.exp() * (ref - mine)).sum(-1)


class CapabilityReplay:
    """λ-free replay term: `step()` returns the mean per-token coarsened KL(base ‖ edited) over the next
    `per_step` chunks of a shuffled cycle (every chunk used about once per len(chunks)/per_step steps)."""

    def __init__(self, model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, gen: torch.Generator,
                 per_step: int = 2, top_k: int = TOP_K, batch_size: int = 8, max_length: int | None = None):
        if not sequences:
            raise ValueError("capability replay needs at least one chunk of text")
        self.model, self.pad_id, self.gen, self.per_step = model, int(pad_id), gen, max(1, int(per_step))
        self.sequences = [list(s)[:max_length] if max_length else list(s) for s in sequences if len(s) >= 2]
        if not self.sequences:
            raise ValueError("capability replay: every chunk is shorter than 2 tokens")
        self.device = next(model.parameters()).device
        # float32 storage halves the memory; a float64 model keeps float64 (the term is then exactly 0 at the base)
        store = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        self.top_ids: list[torch.Tensor] = []  # per chunk [L-1, k] int32 (the base's top-k next tokens)
        self.top_logp: list[torch.Tensor] = []  # per chunk [L-1, k + 1]
        with torch.no_grad():
            for s in range(0, len(self.sequences), batch_size):
                idx = list(range(s, min(s + batch_size, len(self.sequences))))
                logits = self._logits(idx)
                for r, i in enumerate(idx):
                    n = len(self.sequences[i]) - 1
                    lp = torch.log_softmax(logits[r, :n].double(), -1)
                    top = torch.topk(lp, min(top_k, lp.shape[-1]), dim=-1)
                    self.top_ids.append(top.indices.to(torch.int32).cpu())
                    self.top_logp.append(with_rest(top.values).to(store).cpu())
        self.order: list[int] = []

    def _logits(self, idx: Sequence[int]) -> torch.Tensor:
        batch = collate([self.sequences[i] for i in idx], self.pad_id)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def next_chunks(self) -> list[int]:
        take: list[int] = []
        while len(take) < min(self.per_step, len(self.sequences)):
            if not self.order:
                self.order = torch.randperm(len(self.sequences), generator=self.gen).tolist()
            take.append(self.order.pop())
        return take

    def kl(self, idx: Sequence[int]) -> torch.Tensor:
        """Mean per-token coarsened KL(base ‖ current model) over the chunks `idx` (differentiable)."""
        logits = self._logits(idx)
        rows, ids, ref = [], [], []
        for r, i in enumerate(idx):
            n = len(self.sequences[i]) - 1
            rows.append(logits[r, :n])
            ids.append(self.top_ids[i])
            ref.append(self.top_logp[i])
        dev = logits.device
        per_token = coarse_kl(torch.cat(ref).to(dev), torch.cat(ids).to(dev).long(), torch.cat(rows))
        return per_token.mean().to(logits.dtype if logits.dtype == torch.float64 else torch.float32)

    def step(self) -> torch.Tensor:
        return self.kl(self.next_chunks())
