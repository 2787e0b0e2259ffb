"""EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues re-estimated from per-example gradients.

K-FAC approximates a layer's Gauss-Newton block G by S ⊗ A, whose eigenvalues are the products
λ_S,i·λ_A,j. EK-FAC (George et al., 2018) keeps the eigenbasis U = U_S ⊗ U_A but replaces the products by
the second moments of the per-example weight gradients in that basis,

    λ_ij = (1/N) Σ_n Σ_c ( u_S,iᵀ DW_nc u_A,j )²,      DW_nc = Σ_t g_nct a_ntᵀ   (d_out × d_in),

where g_nct is the gradient of the loss with respect to the layer output at position t of example n for
"column" c (the C columns of the softmax cross-entropy Hessian's square root with labels="exact", or
sampled / empirical labels), and N is the number of valid positions (the K-FAC normalisation, so both
describe the Gauss-Newton matrix of the mean loss). With one position per example and exact labels, λ is
exactly the diagonal of the exact Gauss-Newton block rotated into the K-FAC eigenbasis, diag(Uᵀ G U) —
the best diagonal in that basis (closest in Frobenius norm) — for any number of examples. With several
positions per example, `exact` columns also pick up cross-position products; sampled labels are exact in
expectation because the cross-position terms have zero mean.

The masks keep the directions whose corrected eigenvalue is below a γ-energy cutoff; the projector is
crispedit's KroneckerProjector with that mask (the mask need not be a "staircase").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import math

import torch
from torch import nn

from crispedit.config import CurvatureConfig, Labels, Scope
from crispedit.curvature.collect import (Capture, _uniforms, label_losses, lm_batches, logit_gradients,
                                         sqrt_hessian_columns)
from crispedit.curvature.eigen import LayerEigen
from crispedit.curvature.energy import energy_cutoff_values
from crispedit.models.runtime import frozen_parameters


@dataclass
class EKFACEigen:
    """One layer's K-FAC eigenbasis and corrected eigenvalues lam (d_out, d_in); lam[:, :n_sink] = +inf."""

    U_S: torch.Tensor
    U_A: torch.Tensor
    lam: torch.Tensor
    n_sink: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.lam.shape)  # type: ignore[return-value]


class EKFACAccumulator:
    """Running sums Σ (U_Sᵀ DW U_A)² per layer (float64) and the count of valid positions."""

    def __init__(self, eigs: Mapping[str, LayerEigen], chunk: int = 256):
        self.eigs = dict(eigs)
        self.sums = {k: torch.zeros(e.d_out, e.d_in, dtype=torch.float64, device=e.U_S.device)
                     for k, e in self.eigs.items()}
        self.n = 0
        self.chunk = chunk

    def _add(self, name: str, g: torch.Tensor, a: torch.Tensor, weight: float) -> None:
        e = self.eigs[name]
        gr = g.double() @ e.U_S.to(g.device)  # rows: U_Sᵀ g
        ar = a.double() @ e.U_A.to(a.device)  # rows: U_Aᵀ a
        if gr.dim() == 2:  # one position per example: Σ_n (gr_n,i)² (ar_n,j)²
            upd = (gr * gr).T @ (ar * ar)
        else:
            gr = gr.reshape(gr.shape[0], -1, gr.shape[-1])
            ar = ar.reshape(ar.shape[0], -1, ar.shape[-1])
            upd = torch.zeros_like(self.sums[name], device=gr.device)
            for i in range(0, gr.shape[0], self.chunk):
                dw = torch.einsum("bti,btj->bij", gr[i:i + self.chunk], ar[i:i + self.chunk])
                upd += (dw * dw).sum(0)
        self.sums[name] += (upd * weight).to(self.sums[name].device)

    def accumulate_batch(self, modules: dict[str, nn.Module], forward: Callable[[], torch.Tensor],
                         targets: torch.Tensor, valid: torch.Tensor, cfg: CurvatureConfig,
                         generator: torch.Generator | None = None,
                         row_generators: list[torch.Generator] | None = None) -> None:
        """Same inputs as `collect.accumulate_batch`: logits (*positions, C) with examples along dim 0,
        targets (*positions) with -100 = no loss term, valid (*positions) bool (inputs and output
        gradients at invalid positions do not count). With `row_generators` (one per example) sampled labels
        are drawn exactly as K-FAC's collection draws them, so both see the same gradients."""
        if list(modules) != list(self.eigs):
            raise ValueError(f"modules {list(modules)} do not match the eigenbases {list(self.eigs)}")
        with Capture(modules) as cap:
            logits = forward()
            loss_pos = targets != -100
            outs = [cap.outputs[k] for k in modules]
            vmask = valid.to(logits.device)

            def masked(t: torch.Tensor) -> torch.Tensor:
                return t * vmask.reshape(*vmask.shape, 1).to(t.dtype)

            inputs = {k: masked(cap.inputs[k]) for k in modules}
            if bool(loss_pos.any()):
                if cfg.labels == Labels.EXACT:
                    out_logits = logits[loss_pos]
                    cols = list(sqrt_hessian_columns(out_logits))
                    for i, col in enumerate(cols):
                        gs = torch.autograd.grad((out_logits * col).sum(), outs, retain_graph=i < len(cols) - 1,
                                                 allow_unused=True)
                        for name, g in zip(modules, gs):
                            if g is not None:
                                self._add(name, masked(g), inputs[name], 1.0)
                elif cfg.labels == Labels.SAMPLED and row_generators is not None:
                    for m in range(cfg.mc_samples):
                        u = _uniforms(loss_pos.cpu(), None, row_generators)
                        g_logits = logit_gradients(logits, loss_pos, None, u)
                        gs = torch.autograd.grad(logits, outs, grad_outputs=g_logits,
                                                 retain_graph=m < cfg.mc_samples - 1, allow_unused=True)
                        del g_logits
                        for name, g in zip(modules, gs):
                            if g is not None:
                                self._add(name, masked(g), inputs[name], 1.0 / cfg.mc_samples)
                else:
                    for loss, weight, more in label_losses(logits[loss_pos], targets[loss_pos], cfg, generator):
                        gs = torch.autograd.grad(loss, outs, retain_graph=more, allow_unused=True)
                        for name, g in zip(modules, gs):
                            if g is not None:
                                self._add(name, masked(g), inputs[name], weight)
            self.n += int(valid.sum())

    def result(self) -> dict[str, EKFACEigen]:
        if self.n == 0:
            raise ValueError("no positions were accumulated")
        out = {}
        for k, e in self.eigs.items():
            lam = self.sums[k] / self.n
            if e.n_sink:
                lam = lam.clone()
                lam[:, : e.n_sink] = math.inf
            out[k] = EKFACEigen(e.U_S, e.U_A, lam, e.n_sink)
        return out


def collect_ekfac_lm(model: nn.Module, sequences: Sequence[Sequence[int]], eigen: Mapping[str, LayerEigen],
                     cfg: CurvatureConfig, pad_id: int = 0, progress: bool = False) -> dict[str, EKFACEigen]:
    """EK-FAC eigenvalues of a causal LM's next-token loss over `sequences`, in the eigenbases `eigen` of a
    K-FAC collection with settings `cfg` (give it that collection's own sequences, in order, to correct its
    eigenvalues on the same text and with the same sampled labels).

    An example is one sequence: DW_n = Σ_t g_t a_tᵀ over its counted positions (sink positions apart, as in A
    and S), so λ holds the cross-position terms of a sequence's Gauss-Newton matrix that K-FAC's per-position
    products leave out; at the 300-edit delta of docs/scale.md, K-FAC's ½ΔᵀFΔ was about half the exact Gauss-Newton
    form on the same text, EK-FAC's within a tenth of it."""
    names = list(eigen)
    modules = {n: model.get_submodule(n) for n in names}
    device = next(model.parameters()).device
    acc = EKFACAccumulator({n: e for n, e in eigen.items()})
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            for b in lm_batches(sequences, cfg, cfg.batch_size, cfg.max_tokens, pad_id, device,
                                list(range(len(sequences))), None, "EK-FAC eigenvalues" if progress else None):
                acc.accumulate_batch(modules, lambda: model(input_ids=b.ids, attention_mask=b.attention.long()).logits,
                                     b.targets, b.valid, cfg, row_generators=b.generators)
    finally:
        model.train(was_training)
    return acc.result()


def ekfac_masks(eks: Mapping[str, EKFACEigen], gamma: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Bool keep-masks (d_out, d_in): True where the corrected eigenvalue is below the γ-energy cutoff
    (scope "layer": per layer; "global": one cutoff over all layers). Sink columns are never kept."""
    if scope not in Scope.values():
        raise ValueError(f"unknown threshold scope {scope!r}; expected one of {Scope.values()}")

    def keep(e: EKFACEigen, cut: float) -> torch.Tensor:
        k = e.lam < cut
        k[:, : e.n_sink] = False
        return k

    if scope == "global":
        cut = energy_cutoff_values([e.lam for e in eks.values()], gamma)
        return {n: keep(e, cut) for n, e in eks.items()}
    return {n: keep(e, energy_cutoff_values(e.lam, gamma)) for n, e in eks.items()}
