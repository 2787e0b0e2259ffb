"""AlphaEdit: MEMIT's update projected onto the null space of the preserved knowledge's keys (Fang et al.,
"AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025).

Preserved keys K₀ (the layer's inputs over a general corpus) enter through C = E[kkᵀ] — the curvature cache's
input factor A, sink-inclusive by default as for MEMIT. With C = U diag(σ) Uᵀ, the projector onto its
approximate null space is P = U₀ U₀ᵀ, U₀ the eigenvectors with σ < `null_threshold` (the reference code's
absolute threshold on the eigenvalues of the mean second moment). Per layer, with the MEMIT keys K and
residuals R of this chunk and the keys K_p of earlier chunks (sequential editing, C_p = K_p K_pᵀ),

    ΔWᵀ = (P (K Kᵀ + C_p) + α I)⁻¹ P K Rᵀ              (α = `l2`)

the minimiser of ‖ΔK − R‖² + ‖ΔK_p‖² + α‖Δ‖² over updates with Δ = ΔP, whose normal equations are
Δ ((KKᵀ + C_p) P + αI) = R Kᵀ P. Every solution satisfies ΔW (I − P) = 0: the update does not move the
outputs of the preserved keys' kept directions (ΔW K₀ ≈ 0). After each chunk the edited keys, recomputed on the
edited model, are added to C_p so that later chunks leave them alone.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from crispedit.baselines.common import Timer, WeightEditor, chunks, frozen_model
from crispedit.baselines.keys import check_subjects, subject_keys
from crispedit.baselines.config import AlphaEditConfig
from crispedit.baselines.memit import context_prefixes, key_covariance, locate_then_edit, resolve_cache_targets
from crispedit.data.records import EditRequest, check_requests
from crispedit.editing.delta import EditDelta


def null_space_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = U₀U₀ᵀ over the eigenvectors of symmetric PSD `C` with eigenvalue < threshold (float64), and
    the null-space dimension."""
    C = C.double()
    lam, U = torch.linalg.eigh(0.5 * (C + C.T))
    U0 = U[:, lam < threshold]
    return U0 @ U0.T, int(U0.shape[1])


def alphaedit_solve(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, C_p: torch.Tensor, l2: float) -> torch.Tensor:
    """ΔW = [(P(KKᵀ + C_p) + αI)⁻¹ P K Rᵀ]ᵀ in float64.

    Args:
        K: keys `[d_in, n]`.  R: residuals `[d_out, n]`.  P: null-space projector `[d_in, d_in]`.
        C_p: second moment of earlier chunks' edited keys `[d_in, d_in]`.  l2: α.

    Returns:
        ΔW `[d_out, d_in]` (float64), with ΔW (I − P) = 0.
    """
    K, R, P, C_p = K.double(), R.double(), P.double(), C_p.double()
    M = P @ (K @ K.T + C_p) + l2 * torch.eye(K.shape[0], dtype=torch.float64)
    return torch.linalg.solve(M, P @ K @ R.T).T


def run_alphaedit(model: nn.Module, tokenizer, requests: Sequence[EditRequest], curvature, cfg: AlphaEditConfig,
                  targets: Sequence[str] | None = None, progress: bool = False) -> EditDelta:
    """Edit `model` in place with AlphaEdit (batch, or sequential with `cfg.chunk_size`, accumulating the
    edited keys) and return the delta."""
    check_requests(requests)
    check_subjects(requests)
    targets = resolve_cache_targets("alphaedit", model, curvature, targets)
    t0 = time.perf_counter()
    timer = Timer()
    with timer("projectors"):
        proj = {n: null_space_projector(key_covariance(curvature, n, cfg.covariance), cfg.null_threshold)
                for n in targets}
    P = {n: p for n, (p, _) in proj.items()}
    C_p = {n: torch.zeros_like(P[n]) for n in targets}

    def solve(_j: int, name: str, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return alphaedit_solve(K, R, P[name], C_p[name], cfg.l2)

    with frozen_model(model), WeightEditor(model, targets) as editor:
        with timer("prefixes"):
            prefixes = context_prefixes(model, tokenizer, cfg)

        def accumulate(chunk: Sequence[EditRequest]) -> None:
            ks = subject_keys(model, tokenizer, chunk, targets, prefixes)
            for n in targets:
                C_p[n] += ks[n].T @ ks[n]

        chunk_log = []
        offset = 0
        parts = chunks(requests, cfg.chunk_size)
        for c, chunk in enumerate(parts):
            last = c == len(parts) - 1
            chunk_log.append(locate_then_edit(model, tokenizer, chunk, targets, cfg, editor, solve, timer, prefixes,
                                              offset, after_chunk=None if last else accumulate, progress=progress))
            offset += len(chunk)
        extra = {"targets_edited": targets, "context_prefixes": prefixes, "chunks": chunk_log,
                 "null_space_dim": {n: d for n, (_, d) in proj.items()}}
        return editor.finish(requests, "alphaedit", cfg, time.perf_counter() - t0, timer.totals, curvature, extra)
