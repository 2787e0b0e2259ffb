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
- Sampled labels are drawn per *sequence*: sequence i of a collection uses its own random stream, seeded
  by (seed, i) alone, so the statistics are the same whatever the batch size, the order of the batches or
  the number of processes sharing the corpus (torchrun). Labels come from the inverse CDF of the model's
  predictive distribution at one uniform draw per position.
- The gradient of the summed cross-entropy with respect to the logits, softmax(z) − onehot(y), is formed
  a chunk of positions at a time (at most `SOFTMAX_CHUNK` logits turned into probabilities at once) and
  backpropagated with `grad_outputs`: no [batch, length, vocabulary] float32 probability or log-softmax
  tensor is ever held beside the model's own logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import EllipsisType
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.config import CollectConfig, CurvatureConfig, Labels  # noqa: F401 - CollectConfig: the old name
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.models.runtime import frozen_parameters

LABEL_MODES = Labels.values()
# Logit entries (positions x vocabulary) turned into probabilities at once when forming output gradients:
# 2^22 entries are 16 MB in float32 (SmolLM2: 85 positions of its 49,152-token vocabulary).
SOFTMAX_CHUNK = 1 << 22


def sequence_seed(seed: int, index: int) -> int:
    """The seed of sequence `index`'s label stream in a collection seeded `seed` (a hash of both, so that
    neighbouring seeds do not share streams at shifted indices)."""
    digest = hashlib.sha256(f"crispedit-labels:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sequence_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sequence (CPU so that every device draws the same labels)."""
    return [torch.Generator().manual_seed(sequence_seed(seed, i)) for i in indices]


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
def _uniforms(loss_pos: torch.Tensor, generator: torch.Generator | None,
              row_generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """One uniform float64 draw per loss position, in row-major order of `loss_pos` (CPU). With
    `row_generators`, example e (dim 0) draws its positions' uniforms from its own generator, so its
    labels do not depend on which other examples share the batch."""
    if row_generators is None:
        return torch.rand(int(loss_pos.sum()), generator=generator, dtype=torch.float64)
    if len(row_generators) != loss_pos.shape[0]:
        raise ValueError(f"{len(row_generators)} generators for {loss_pos.shape[0]} examples")
    counts = loss_pos.reshape(loss_pos.shape[0], -1).sum(1).tolist()
    return torch.cat([torch.rand(int(c), generator=g, dtype=torch.float64) for g, c in zip(row_generators, counts)])


def logit_gradients(logits: torch.Tensor, loss_pos: torch.Tensor, targets: torch.Tensor | None,
                    uniforms: torch.Tensor | None, chunk: int | None = None) -> torch.Tensor:
    """∂(Σ cross-entropy)/∂logits = softmax(z) − onehot(y) at the loss positions (zero elsewhere), in the
    logits' dtype. y is `targets` (empirical labels) or, with `uniforms`, drawn from softmax(z) by the
    inverse CDF. Probabilities are formed in float32 (float64 for float64 logits), `chunk` logit entries at
    a time; the CDF is accumulated in float64."""
    C = logits.shape[-1]
    chunk = SOFTMAX_CHUNK if chunk is None else chunk
    flat = logits.detach().reshape(-1, C)
    rows = loss_pos.reshape(-1).nonzero().squeeze(1).to(flat.device)
    grad = torch.zeros_like(flat)
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    y_all = None if targets is None else targets.reshape(-1)[loss_pos.reshape(-1)].to(flat.device)
    step = max(1, int(chunk) // C)
    for i in range(0, rows.numel(), step):
        r = rows[i : i + step]
        p = torch.softmax(flat[r].to(cdtype), dim=-1)
        if uniforms is not None:
            cdf = p.double().cumsum(-1)
            u = uniforms[i : i + step].to(device=cdf.device) * cdf[:, -1]
            y = torch.searchsorted(cdf, u.unsqueeze(1)).squeeze(1).clamp_max(C - 1)
            del cdf
        else:
            y = y_all[i : i + step]
        p[torch.arange(r.numel(), device=p.device), y] -= 1.0
        grad[r] = p.to(grad.dtype)
    return grad.view_as(logits)


def accumulate_batch(
    stats: KFACStats,
    modules: dict[str, nn.Module],
    forward: Callable[[], torch.Tensor],
    targets: torch.Tensor,
    valid: torch.Tensor,
    cfg: CurvatureConfig,
    generator: torch.Generator | None = None,
    sink: torch.Tensor | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
    softmax_chunk: int | None = None,
) -> None:
    """Run one batch and add its statistics to `stats`.

    forward(): returns logits of shape (*positions, C) (e.g. (B, T, V)).
    targets:   (*positions) next-token labels, -100 where there is no loss term.
    valid:     (*positions) bool, positions whose inputs/gradients count (padding excluded).
    sink:      optional (*positions) bool, positions summed apart into A_sink (excluded from A, S).
    generator / row_generators: the stream sampled labels are drawn from — one for the whole batch, or one
               per example along dim 0 (see `sequence_generators`).
    """
    with Capture(modules) as cap:
        logits = forward()
        loss_pos = targets != -100
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

        if bool(loss_pos.any()):
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
                for m in range(cfg.mc_samples):
                    if cfg.labels == Labels.SAMPLED:
                        u = _uniforms(loss_pos.cpu(), generator, row_generators)
                        g_logits = logit_gradients(logits, loss_pos, None, u, softmax_chunk)
                    else:
                        g_logits = logit_gradients(logits, loss_pos, targets, None, softmax_chunk)
                    gs = torch.autograd.grad(logits, n_out, grad_outputs=g_logits,
                                             retain_graph=m < cfg.mc_samples - 1, allow_unused=True)
                    del g_logits
                    add_grads(gs, 1.0 / cfg.mc_samples)

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


@dataclass
class LMBatch:
    """One padded batch of a next-token collection: which sequences, their ids, attention, next-token targets
    (-100: no loss term), the positions that count (`valid`), the first-token sink positions summed apart
    (`sink`, or None) and the sequences' own label streams (`generators`, sampled labels only)."""

    index: list[int]
    ids: torch.Tensor
    attention: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    sink: torch.Tensor | None
    generators: list[torch.Generator] | None


def lm_batches(sequences: Sequence[Sequence[int]], cfg: CurvatureConfig, batch_size: int, max_tokens: int | None,
               pad_id: int, device: torch.device | str, indices: Sequence[int],
               positions: Sequence[Sequence[int] | None] | None = None, desc: str | None = None) -> Iterator[LMBatch]:
    """The batches every next-token statistic (K-FAC's factors, EK-FAC's eigenvalues) is summed over, grouped by
    length (`_batches`); `desc`: show a progress bar with this title."""
    batches = _batches(sequences, batch_size, max_tokens)
    for idx in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
        seqs = [list(sequences[i]) for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            keep = None if positions is None else positions[idx[r]]
            if keep is None:
                mask[r, : len(s)] = True
            else:
                mask[r, [p for p in keep if 0 <= p < len(s)]] = True
        attn = (torch.arange(T).expand(len(seqs), T) < torch.tensor([len(s) for s in seqs])[:, None])
        ids, mask, attn = ids.to(device), mask.to(device), attn.to(device)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = torch.where(attn[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
        valid, sink = mask, None
        if cfg.sink_tokens > 0:
            pos = torch.arange(T, device=device).expand_as(mask)  # counted positions only, as A and S
            sink = mask & (pos < cfg.sink_tokens)
            valid = mask & ~sink
        gens = sequence_generators(cfg.seed, [indices[i] for i in idx]) if cfg.labels == Labels.SAMPLED else None
        yield LMBatch(list(idx), ids, attn, targets, valid, sink, gens)


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
    indices: Sequence[int] | None = None,
    positions: Sequence[Sequence[int] | None] | None = None,
) -> KFACStats:
    """K-FAC statistics of a causal LM's next-token loss over token sequences (full-sequence loss).

    Every valid position contributes its input activation to A and its output gradient to S; every
    position that has a next token in the sequence contributes a loss term (labels sampled from the
    model, or the sequence's own next token). Adds into `stats` when given (sequential editing, extension).

    Args:
        cfg: collection settings (default `CurvatureConfig()`); `batch_size` and `max_tokens` default to its
            values (`max_tokens=None`: no limit).
        progress: show a progress bar (default False).
        indices: the sequences' positions in the whole collection (default 0, 1, ...): sequence i's
            sampled labels come from the stream `sequence_seed(cfg.seed, indices[i])`, so a shard collected
            with its global indices draws exactly what the whole collection would.
        positions: per sequence, the positions whose inputs and output gradients count (None: every position).
            The loss terms stay at every position, so a counted position's gradient is the whole sequence's
            loss seen from there (CrispEdit-Seq counts an edit where the edit acted: its subject's last token).
    """
    cfg = cfg if cfg is not None else CurvatureConfig()
    batch_size = cfg.batch_size if batch_size is None else batch_size
    max_tokens = cfg.max_tokens if max_tokens is ... else max_tokens
    modules = {n: model.get_submodule(n) for n in target_names}
    device = next(model.parameters()).device
    if stats is None:
        stats = empty_stats(modules, sink=cfg.sink_tokens > 0, device=device)
    indices = list(range(len(sequences))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(sequences):
        raise ValueError(f"{len(indices)} indices for {len(sequences)} sequences")
    if positions is not None and len(positions) != len(sequences):
        raise ValueError(f"{len(positions)} position lists for {len(sequences)} sequences")
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            for b in lm_batches(sequences, cfg, batch_size, max_tokens, pad_id, device, indices, positions,
                                desc if progress else None):
                accumulate_batch(
                    stats, modules,
                    lambda: model(input_ids=b.ids, attention_mask=b.attention.long()).logits,
                    b.targets, b.valid, cfg, None, b.sink, row_generators=b.generators,
                )
    finally:
        model.train(was_training)
    return stats
