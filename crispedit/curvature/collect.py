"""Collect K-FAC statistics (A = Σ a aᵀ of layer inputs, S = Σ ĝ ĝᵀ of output gradients) with hooks.

Design choices that matter for speed and correctness:
- Parameters are frozen during collection and the gradient is taken with `torch.autograd.grad` with
  respect to the target layers' *outputs* only, so no parameter `.grad` is ever touched, no weight
  gradients are computed, and the backward pass stops at the lowest target layer.
- `sampled` labels replace the data's labels (one backward, same cost as `empirical`): the expectation
  of ĝĝᵀ over labels drawn from the model's own predictive distribution is the output-Hessian term of the
  Gauss-Newton matrix (true Fisher) — the curvature of the Bregman constraint CrispEdit bounds.
  `empirical` uses the data's labels (the empirical Fisher, what the authors' code computes).
  `exact` backpropagates every column of the square root of the softmax cross-entropy Hessian
  (C backward passes) — only for small output spaces (tests, the MNIST study).
- Only valid positions (attention mask = 1) count; padding never does. Sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import EllipsisType
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.config import CollectConfig, CurvatureConfig, Labels  # noqa: F401 - CollectConfig: the old name
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.models.runtime import frozen_parameters

LABEL_MODES = Labels.values()


class Capture:
    """Forward hooks that record each target's input and make its output differentiable."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(mod, inp, out):
            self.inputs[name] = inp[0].detach()
            if not out.requires_grad:
                # Nothing below this layer needs a gradient: a fresh leaf is enough.
                out = out.detach().requires_grad_(True)
                self.outputs[name] = out
                return out
            self.outputs[name] = out
            return None

        return hook

    def __enter__(self) -> "Capture":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.inputs.clear()
        self.outputs.clear()


def sqrt_hessian_columns(logits: torch.Tensor) -> Iterator[torch.Tensor]:
    """Columns of B with B Bᵀ = diag(p) − p pᵀ (softmax cross-entropy Hessian): √p_c (e_c − p)."""
    p = torch.softmax(logits.detach().double(), dim=-1)
    sq = p.sqrt()
    for c in range(p.shape[-1]):
        col = -p * sq[:, c : c + 1]
        col[:, c] += sq[:, c]
        yield col.to(logits.dtype)


def label_losses(out_logits: torch.Tensor, data_labels: torch.Tensor, cfg: CurvatureConfig,
                 generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, float, bool]]:
    """The losses whose output gradients enter S with `sampled` or `empirical` labels, one per Monte-Carlo
    sample: (sum of the cross-entropies over the rows of `out_logits` (N, C), weight 1/mc_samples, whether
    another loss follows (keep the graph)). Sampled labels are drawn from softmax in float32; low-precision
    logits are upcast, float64 stays float64 (oracle tests). Shared by K-FAC and EK-FAC."""
    for m in range(cfg.mc_samples):
        if cfg.labels == Labels.SAMPLED:
            probs = torch.softmax(out_logits.detach().float(), dim=-1)
            y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            y = data_labels
        upcast = out_logits if out_logits.dtype == torch.float64 else out_logits.float()
        yield nn.functional.cross_entropy(upcast, y, reduction="sum"), 1.0 / cfg.mc_samples, m < cfg.mc_samples - 1


def accumulate_batch(
    stats: KFACStats,
    modules: dict[str, nn.Module],
    forward: Callable[[], torch.Tensor],
    targets: torch.Tensor,
    valid: torch.Tensor,
    cfg: CurvatureConfig,
    generator: torch.Generator | None = None,
    sink: torch.Tensor | None = None,
) -> None:
    """Run one batch and add its statistics to `stats`.

    forward(): returns logits of shape (*positions, C) (e.g. (B, T, V)).
    targets:   (*positions) next-token labels, -100 where there is no loss term.
    valid:     (*positions) bool, positions whose inputs/gradients count (padding excluded).
    sink:      optional (*positions) bool, positions summed apart into A_sink (excluded from A, S).
    """
    with Capture(modules) as cap:
        logits = forward()
        loss_pos = targets != -100
        out_logits = logits[loss_pos]
        n_out = [cap.outputs[k] for k in modules]
        grads_sq: dict[str, torch.Tensor] = {}

        def add_grads(gs: Sequence[torch.Tensor | None], weight: float) -> None:
            for name, g in zip(modules, gs):
                if g is None:
                    continue
                gv = g[valid].double()
                upd = gv.T @ gv
                if weight != 1.0:
                    upd *= weight
                grads_sq[name] = grads_sq[name] + upd if name in grads_sq else upd

        if out_logits.numel() > 0:
            if cfg.labels == "exact":
                # One backward per (sequence position, Hessian-square-root column): the per-position loss
                # terms are kept apart so no cross-position products enter S — the same matrix that the
                # sampled estimator converges to (independent labels per position make those terms vanish).
                # Rows of a 2-D (N, C) logits tensor are independent data and share each backward.
                groups = [loss_pos] if logits.dim() == 2 else [
                    loss_pos & (torch.arange(loss_pos.shape[-1], device=loss_pos.device) == t)
                    for t in range(loss_pos.shape[-1]) if bool(loss_pos[..., t].any())]
                jobs = [(sel, col) for sel in groups for col in sqrt_hessian_columns(logits[sel])]
                for i, (sel, col) in enumerate(jobs):
                    gs = torch.autograd.grad((logits[sel] * col).sum(), n_out, retain_graph=i < len(jobs) - 1,
                                             allow_unused=True)
                    add_grads(gs, 1.0)
            else:
                for loss, weight, more in label_losses(out_logits, targets[loss_pos], cfg, generator):
                    gs = torch.autograd.grad(loss, n_out, retain_graph=more, allow_unused=True)
                    add_grads(gs, weight)

        n_valid = int(valid.sum())
        for name in modules:
            st = stats.layers[name]
            a = cap.inputs[name]
            av = a[valid].double()
            st.A += av.T @ av
            st.n += n_valid
            if name in grads_sq:
                st.S += grads_sq[name].to(st.S.device)
            if sink is not None and st.A_sink is not None:
                asv = a[sink].double()
                st.A_sink += asv.T @ asv
                st.n_sink += int(sink.sum())


def empty_stats(modules: dict[str, nn.Module], sink: bool = False, device: torch.device | str = "cpu") -> KFACStats:
    from crispedit.models.targets import layer_io_dims

    out = {}
    for name, mod in modules.items():
        d_in, d_out = layer_io_dims(mod)
        out[name] = LayerStats.zeros(d_in, d_out, sink=sink, device=device)
    return KFACStats(out)


def _batches(seqs: Sequence[Sequence[int]], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Deterministic batches of sequence indices, grouped by length to limit padding."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        L = len(seqs[i])
        new_max = max(cur_max, L)
        if cur and (len(cur) >= batch_size or (max_tokens and new_max * (len(cur) + 1) > max_tokens)):
            batches.append(cur)
            cur, new_max = [], L
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def collect_lm_stats(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    target_names: Sequence[str],
    cfg: CurvatureConfig | None = None,
    batch_size: int | None = None,
    max_tokens: int | None | EllipsisType = ...,
    pad_id: int = 0,
    stats: KFACStats | None = None,
    progress: bool = False,
    desc: str = "K-FAC statistics",
) -> KFACStats:
    """K-FAC statistics of a causal LM's next-token loss over token sequences (full-sequence loss).

    Every valid position contributes its input activation to A and its output gradient to S; every
    position that has a next token in the sequence contributes a loss term (labels sampled from the
    model, or the sequence's own next token). Adds into `stats` when given (sequential editing, extension).

    Args:
        cfg: collection settings (default `CurvatureConfig()`); `batch_size` and `max_tokens` default to its
            values (`max_tokens=None`: no limit).
        progress: show a progress bar (default False).
    """
    cfg = cfg if cfg is not None else CurvatureConfig()
    batch_size = cfg.batch_size if batch_size is None else batch_size
    max_tokens = cfg.max_tokens if max_tokens is ... else max_tokens
    modules = {n: model.get_submodule(n) for n in target_names}
    device = next(model.parameters()).device
    if stats is None:
        stats = empty_stats(modules, sink=cfg.sink_tokens > 0, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    batches = _batches(sequences, batch_size, max_tokens)
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                seqs = [list(sequences[i]) for i in idx]
                T = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), T), dtype=torch.bool)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = True
                ids, mask = ids.to(device), mask.to(device)
                targets = torch.full_like(ids, -100)
                targets[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
                valid, sink = mask, None
                if cfg.sink_tokens > 0:
                    pos = torch.arange(T, device=device).expand_as(mask)
                    sink = mask & (pos < cfg.sink_tokens)
                    valid = mask & ~sink
                accumulate_batch(
                    stats, modules,
                    lambda: model(input_ids=ids, attention_mask=mask.long()).logits,
                    targets, valid, cfg, gen, sink,
                )
    finally:
        model.train(was_training)
    return stats
