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
from crispedit.baselines.keys import Located, locate, subject_span, target_ids
from crispedit.data.records import EditRequest
from crispedit.formatting import collate
from crispedit.models.runtime import pad_id_of


@dataclass(frozen=True)
class ValueSettings:
    """The value optimisation's knobs (the user-facing ones live in `memit.LocateEditConfig`)."""

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

    first_rows = torch.arange(0, n_rewrite, n_ctx, device=device)  # each request's raw prompt
    kl_rows_t = torch.tensor(kl_rows, device=device)
    g_rows = torch.cat([lr_rows, kl_rows_t])
    g_pos = torch.cat([lr_pos, lookup_t[kl_rows_t]])
    n_lab = lr_rows.numel()
    fwd = _Forward(model, block, input_ids, attn, rows_t, lookup_t, owner_t, g_rows, g_pos)
    init = fwd.h[first_rows, lookup_t[first_rows]].detach().double()
    delta = torch.zeros(n, fwd.h.shape[-1], dtype=vdtype, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    init_norm = init.norm(dim=1).to(vdtype)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    final_loss = [float("nan")] * n
    final_nll = [float("nan")] * n
    steps = [0] * n
    kl_init = None
    for it in range(cfg.steps):
        logits = fwd(delta)
        lp = torch.log_softmax(logits[:n_lab], -1)
        tok_nll = -lp.gather(1, lr_tok[:, None])[:, 0] / lr_len
        row_nll = torch.zeros(n_rewrite, dtype=vdtype, device=device).index_add(0, lr_rows, tok_nll.to(vdtype))
        nll = torch.zeros(n, dtype=vdtype, device=device).index_add(0, owner_t[:n_rewrite], row_nll) / n_ctx
        kl_lp = torch.log_softmax(logits[n_lab:], -1)
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
        active = (~done).to(loss.dtype)
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
    return Values((init + delta.detach().double()).cpu(), init.cpu(), final_loss, final_nll, steps)  # CPU, as the keys


class _Forward:
    """Logits at the gathered (row, position) pairs with δ[owner] added to block `block`'s output at each
    row's lookup position.

    The blocks up to `block` do not depend on δ, so their output is computed once and each step runs only
    the later blocks (the decoder with its layer list cut, fed that output as input embeddings) and the
    output head at the gathered positions. This shortcut is used only when, on the δ = 0 pass, it reproduces
    the full model's logits; otherwise every step runs the full model with a forward hook.
    """

    def __init__(self, model, block, input_ids, attn, rows, lookup, owner, g_rows, g_pos):
        self.model, self.block, self.input_ids, self.attn = model, block, input_ids, attn
        self.rows, self.lookup, self.owner, self.g_rows, self.g_pos = rows, lookup, owner, g_rows, g_pos
        got = {}

        def grab(_m, _inp, out):
            got["h"] = (out[0] if isinstance(out, tuple) else out).detach()

        handle = model.get_submodule(block).register_forward_hook(grab)
        try:
            with torch.no_grad():
                ref = model(input_ids=input_ids, attention_mask=attn).logits[g_rows, g_pos]
        finally:
            handle.remove()
        self.h = got["h"]
        self.tail = _tail_runner(model, block)
        if self.tail is not None:
            with torch.no_grad():
                fast = self._tail_logits(self.h)
            if fast.shape != ref.shape or not torch.allclose(fast, ref, rtol=1e-4,
                                                             atol=1e-4 * float(ref.abs().max())):
                self.tail = None

    def _added(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return h + torch.zeros_like(h).index_put((self.rows, self.lookup), delta[self.owner].to(h.dtype))

    def _tail_logits(self, h: torch.Tensor) -> torch.Tensor:
        hidden = self.tail(h, self.attn)
        return self.model.get_output_embeddings()(hidden[self.g_rows, self.g_pos])

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        if self.tail is not None:
            return upcast(self._tail_logits(self._added(self.h, delta)))

        def hook(_m, _inp, out):
            if isinstance(out, tuple):
                return (self._added(out[0], delta),) + tuple(out[1:])
            return self._added(out, delta)

        handle = self.model.get_submodule(self.block).register_forward_hook(hook)
        try:
            logits = self.model(input_ids=self.input_ids, attention_mask=self.attn).logits
        finally:
            handle.remove()
        return upcast(logits[self.g_rows, self.g_pos])


def _tail_runner(model: nn.Module, block: str):
    """A function running the decoder's blocks after `block` on hidden states (final norm included), or None
    when the model does not expose its decoder and block list in the usual Hugging Face way."""
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None:
        return None
    target = model.get_submodule(block)
    for attr, child in decoder.named_children():
        if isinstance(child, nn.ModuleList):
            for i, m in enumerate(child):
                if m is target:
                    def run(h, attn, attr=attr, full=child, i=i):
                        setattr(decoder, attr, nn.ModuleList(list(full)[i + 1 :]))
                        try:
                            return decoder(inputs_embeds=h, attention_mask=attn, use_cache=False).last_hidden_state
                        finally:
                            setattr(decoder, attr, full)
                    return run
    return None
