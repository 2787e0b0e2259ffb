"""MEMIT's target values: for each request, the residual-stream vector z at the subject's last token of the
last edited layer that makes the model say the new target (Meng et al. 2023, §4.3 / ROME's "v*").

z = h + δ, where h is the block's output there and δ minimises, per request,

    L(δ) = mean over contexts c of  −(1/|y|) Σ_t log p(y_t | c + prompt + y_<t ; h ← h + δ)
           + kl_factor · KL( p(· | "{subject} is a"; δ) ‖ p(· | "{subject} is a"; 0) )   (essence drift)
           + weight_decay · ‖δ‖ / ‖h‖²

with Adam, ‖δ‖ clamped to `clamp_norm_factor`·‖h‖ after each step, and an early stop once L < 0.05
(the reference implementation's objective, including its unsquared decay term). δ is added at the subject's
last token of every sequence of the request (all contexts and the KL prompt).

Requests are optimised together in groups (each has its own δ row, its own loss term and its own early
stop; Adam is element-wise, so this equals optimising them one at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from crispedit.baselines.common import upcast
from crispedit.baselines.keys import Located, locate, pad_id_of, subject_span, target_ids
from crispedit.data.records import EditRequest
from crispedit.formatting import collate


@dataclass(frozen=True)
class ValueSettings:
    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    group_size: int = 8


@dataclass
class Values:
    """z = init + delta per request `[n, d_model]` (float64) and the optimisation's final losses."""

    z: torch.Tensor
    init: torch.Tensor
    final_loss: list[float]
    final_nll: list[float]
    steps: list[int]


def _sequences(tokenizer, request: EditRequest, index: int, prefixes: Sequence[str]):
    """Rewriting sequences (each context + prompt + target[:-1]) with their label positions, and the KL
    prompt "{subject} is a"."""
    span = subject_span(request, index)
    tgt = target_ids(tokenizer, request.prompt, request.target)
    rows = []
    for p in [""] + list(prefixes):
        loc = locate(tokenizer, p, request.prompt, span)
        ids = loc.ids + tgt[:-1]
        first = len(loc.ids) - 1  # position predicting the first target token
        rows.append((Located(ids, loc.subject_last), list(range(first, first + len(tgt))), tgt))
    subj = request.subject
    kl = locate(tokenizer, "", subj + " is a", (0, len(subj)))
    return rows, kl


def optimize_values(model: nn.Module, tokenizer, requests: Sequence[EditRequest], block: str,
                    prefixes: Sequence[str], cfg: ValueSettings = ValueSettings(),
                    index_offset: int = 0) -> Values:
    """Target values at the output of decoder block `block` for every request (model weights untouched)."""
    zs, inits, losses, nlls, steps = [], [], [], [], []
    for s in range(0, len(requests), cfg.group_size):
        g = _optimize_group(model, tokenizer, requests[s : s + cfg.group_size], block, prefixes, cfg,
                            index_offset + s)
        zs.append(g.z)
        inits.append(g.init)
        losses += g.final_loss
        nlls += g.final_nll
        steps += g.steps
    return Values(torch.cat(zs), torch.cat(inits), losses, nlls, steps)


def _optimize_group(model, tokenizer, requests, block, prefixes, cfg: ValueSettings, index_offset: int) -> Values:
    device = next(model.parameters()).device
    n = len(requests)
    seqs, owner, lookup, label_pos, label_ids = [], [], [], [], []
    kl_rows, kl_seqs = [], []
    for i, r in enumerate(requests):
        rows, kl = _sequences(tokenizer, r, index_offset + i, prefixes)
        kl_seqs.append(kl)
        for loc, pos, tgt in rows:
            seqs.append(loc.ids)
            owner.append(i)
            lookup.append(loc.subject_last)
            label_pos.append(pos)
            label_ids.append(tgt)
    n_rewrite = len(seqs)
    for i, kl in enumerate(kl_seqs):
        kl_rows.append(len(seqs))
        seqs.append(kl.ids)
        owner.append(i)
        lookup.append(kl.subject_last)
    batch = collate(seqs, pad_id_of(tokenizer), padding_side="right")
    input_ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    owner_t = torch.tensor(owner, device=device)
    rows_t = torch.arange(len(seqs), device=device)
    lookup_t = torch.tensor(lookup, device=device)
    n_ctx = n_rewrite // n

    # label gather indices for the rewriting rows
    lr_rows = torch.tensor([r for r, pos in enumerate(label_pos) for _ in pos], device=device)
    lr_pos = torch.tensor([p for pos in label_pos for p in pos], device=device)
    lr_tok = torch.tensor([t for ids in label_ids for t in ids], device=device)
    # float32 optimisation state (float64 for a float64 model, so tiny-model tests are exact)
    vdtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    lr_len = torch.tensor([len(label_ids[r]) for r, pos in enumerate(label_pos) for _ in pos],
                          dtype=vdtype, device=device)

    module = model.get_submodule(block)
    d_model = None
    init: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def hook(_m, _inp, out):
        nonlocal init, d_model
        h = out[0] if isinstance(out, tuple) else out
        if init is None:
            d_model = h.shape[-1]
            # h at the subject's last token of each request's raw prompt (its first rewriting row)
            first_rows = torch.arange(0, n_rewrite, n_ctx, device=h.device)
            init = h[first_rows, lookup_t[first_rows]].detach().double()
            return None
        add = torch.zeros_like(h)
        add = add.index_put((rows_t, lookup_t), delta[owner_t].to(h.dtype))
        h = h + add
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attn)  # records init (δ = 0)
        delta = torch.zeros(n, d_model, dtype=vdtype, device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        init_norm = init.norm(dim=1).to(vdtype)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        final_loss = [float("nan")] * n
        final_nll = [float("nan")] * n
        steps = [0] * n
        kl_init = None
        kl_rows_t = torch.tensor(kl_rows, device=device)
        for it in range(cfg.steps):
            logits = upcast(model(input_ids=input_ids, attention_mask=attn).logits)
            lp = torch.log_softmax(logits[lr_rows, lr_pos], -1)
            tok_nll = -lp.gather(1, lr_tok[:, None])[:, 0] / lr_len
            row_nll = torch.zeros(n_rewrite, dtype=vdtype, device=device).index_add(0, lr_rows, tok_nll.to(vdtype))
            nll = torch.zeros(n, dtype=vdtype, device=device).index_add(0, owner_t[:n_rewrite], row_nll) / n_ctx
            kl_lp = torch.log_softmax(logits[kl_rows_t, lookup_t[kl_rows_t]], -1)
            if kl_init is None:
                kl_init = kl_lp.detach()
            kl = cfg.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum(-1).to(vdtype)
            wd = cfg.weight_decay * delta.norm(dim=1) / init_norm ** 2
            loss = nll + kl + wd
            with torch.no_grad():
                for i in range(n):
                    if not done[i]:
                        final_loss[i], final_nll[i], steps[i] = float(loss[i]), float(nll[i]), it
                done |= loss.detach() < cfg.early_stop_loss
            if bool(done.all()) or it == cfg.steps - 1:
                break
            active = (~done).float()
            opt.zero_grad()
            (loss * active).sum().backward()
            keep = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[done] = keep[done]
                max_norm = cfg.clamp_norm_factor * init_norm
                norm = delta.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-30), torch.ones_like(norm))
                delta.mul_(scale[:, None])
    finally:
        handle.remove()
    assert init is not None and delta is not None
    return Values(init + delta.detach().double(), init, final_loss, final_nll, steps)
