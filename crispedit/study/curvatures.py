"""The capability-curvature bases compared by the study and their γ-approximate null-space projectors.

A *basis* is the γ-independent part (an eigendecomposition at the current parameters θ); `projector(γ)`
derives the projector for one γ, so one decomposition at θ0 serves every γ of the sweep.

Fine-tuned parameters: the weights of the head's fc2 and fc3 (biases frozen), flattened row-major in that
order — the same vec(W) order as K-FAC's S ⊗ A blocks and as curvlinops' parameter list.

- hessian / ggn: the exact d×d matrix of the mean MNIST cross-entropy (curvlinops Hessian / GGN linear
  operators applied to the identity), eigh in float64, eigenvalues clamped at 0; the γ-approximate null
  space removes the top eigenvectors holding γ of the eigenvalue sum (paper, eq. 3), one cutoff over all
  parameters.
- kfac: crispedit's K-FAC (labels="exact", so A ⊗ S approximates the GGN blocks), eigen + masks with one
  global energy cutoff over both layers (as for the exact matrices), KroneckerProjector per layer.
- ekfac: the same eigenbasis with per-example corrected eigenvalues (crispedit.curvature.ekfac).
- activation-covariance (Adam-NSCL): A's eigenbasis per layer; the input directions holding γ of A's
  energy are removed (InputNullspaceProjector), whatever the output-gradient factor.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from crispedit.config import CurvatureConfig
from crispedit.curvature.collect import accumulate_batch
from crispedit.curvature.eigen import LayerEigen, eigendecompose, sym_eigh
from crispedit.curvature.ekfac import EKFACAccumulator, EKFACEigen, ekfac_masks, energy_cutoff_values
from crispedit.curvature.masks import build_masks
from crispedit.curvature.projector import InputNullspaceProjector, KroneckerProjector
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.models.runtime import frozen_parameters
from crispedit.study.lenet import Head

CURVATURE_METHODS = ("hessian", "ggn", "kfac", "ekfac", "activation-covariance")
LAYERS = ("fc2", "fc3")


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run a block with n intra-op threads (None: unchanged). The study's small ops (a 2-layer head on a
    batch of 128) run several times faster on one thread, especially on a busy machine; the dense
    matrix builds and eigh use the caller's thread count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tuned_modules(head: Head) -> dict[str, nn.Linear]:
    return {"fc2": head.fc2, "fc3": head.fc3}


def tuned_params(head: Head) -> list[nn.Parameter]:
    return [head.fc2.weight, head.fc3.weight]


class Projector(Protocol):
    kept_fraction: float

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]: ...


@dataclass
class DenseProjector:
    """P g = g − U_r U_rᵀ g over the flattened weights (or U_k U_kᵀ g when fewer directions are kept)."""

    U_removed: torch.Tensor
    U_kept: torch.Tensor
    shapes: list[torch.Size]

    @property
    def kept_fraction(self) -> float:
        d = self.U_removed.shape[0]
        return self.U_kept.shape[1] / d if d else 1.0

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        g = torch.cat([x.reshape(-1) for x in grads]).to(self.U_removed.dtype)
        if self.U_removed.shape[1] <= self.U_kept.shape[1]:
            p = g - self.U_removed @ (self.U_removed.T @ g)
        else:
            p = self.U_kept @ (self.U_kept.T @ g)
        out, i = [], 0
        for s, x in zip(self.shapes, grads):
            n = math.prod(s)
            out.append(p[i:i + n].reshape(s).to(x.dtype))
            i += n
        return out


@dataclass
class LayerwiseProjector:
    """One projector per fine-tuned weight matrix (K-FAC, EK-FAC, activation covariance); `sizes` are the
    matrices' parameter counts (to weight the kept fractions)."""

    projs: list
    sizes: list[int]

    @property
    def kept_fraction(self) -> float:
        return sum(p.kept_fraction * n for p, n in zip(self.projs, self.sizes)) / sum(self.sizes)

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p(g) for p, g in zip(self.projs, grads)]


@dataclass
class DenseBasis:
    lam: torch.Tensor  # clamped eigenvalues, descending (float64)
    U: torch.Tensor  # eigenvectors as columns (float32 for the projector)
    shapes: list[torch.Size]
    n_negative: int = 0
    info: dict = field(default_factory=dict)

    def projector(self, gamma: float) -> DenseProjector:
        cut = energy_cutoff_values(self.lam, gamma)
        removed = self.lam >= cut
        return DenseProjector(self.U[:, removed].contiguous(), self.U[:, ~removed].contiguous(), self.shapes)


@dataclass
class KFACBasis:
    eigs: dict[str, LayerEigen]
    info: dict = field(default_factory=dict)

    def projector(self, gamma: float) -> LayerwiseProjector:
        masks = build_masks(self.eigs, gamma, scope="global")
        return LayerwiseProjector([KroneckerProjector(e.U_S, e.U_A, masks[k]) for k, e in self.eigs.items()],
                                  [e.d_out * e.d_in for e in self.eigs.values()])


@dataclass
class EKFACBasis:
    eks: dict[str, EKFACEigen]
    info: dict = field(default_factory=dict)

    def projector(self, gamma: float) -> LayerwiseProjector:
        masks = ekfac_masks(self.eks, gamma, scope="global")
        return LayerwiseProjector([KroneckerProjector(e.U_S, e.U_A, masks[k]) for k, e in self.eks.items()],
                                  [e.lam.numel() for e in self.eks.values()])


@dataclass
class ActivationBasis:
    eigs: dict[str, LayerEigen]
    info: dict = field(default_factory=dict)

    def projector(self, gamma: float) -> LayerwiseProjector:
        projs = []
        for e in self.eigs.values():
            keep = e.lam_A < energy_cutoff_values(e.lam_A, gamma)
            projs.append(InputNullspaceProjector(e.U_A, keep))
        return LayerwiseProjector(projs, [e.d_out * e.d_in for e in self.eigs.values()])


Basis = DenseBasis | KFACBasis | EKFACBasis | ActivationBasis


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def exact_matrix(kind: str, head: Head, x: torch.Tensor, y: torch.Tensor, batch: int = 2500,
                 col_chunk: int = 640) -> torch.Tensor:
    """The exact Hessian or GGN (float64, d×d) of the mean cross-entropy over (x, y) with respect to the
    head's weights, from curvlinops' operators applied to identity columns."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    op_cls = {"hessian": HessianLinearOperator, "ggn": GGNLinearOperator}[kind]
    params = tuned_params(head)
    with frozen_parameters(head, trainable=params):
        op = op_cls(head, nn.CrossEntropyLoss(), params, _batches(x, y, batch), check_deterministic=False)
        d = sum(p.numel() for p in params)
        eye = torch.eye(d, dtype=x.dtype)
        M = torch.cat([op @ eye[:, i:i + col_chunk] for i in range(0, d, col_chunk)], dim=1).double()
    return 0.5 * (M + M.T)


def kfac_stats(head: Head, x: torch.Tensor, y: torch.Tensor, batch: int = 2500) -> KFACStats:
    """crispedit K-FAC statistics of the head's weights with exact output-Hessian columns."""
    modules = tuned_modules(head)
    stats = KFACStats({k: LayerStats.zeros(m.in_features, m.out_features) for k, m in modules.items()})
    cfg = CurvatureConfig(labels="exact")
    with frozen_parameters(head):
        for xb, yb in _batches(x, y, batch):
            accumulate_batch(stats, modules, lambda xb=xb: head(xb), yb, torch.ones(len(yb), dtype=torch.bool), cfg)
    return stats


def ekfac_eigen(head: Head, eigs: dict[str, LayerEigen], x: torch.Tensor, y: torch.Tensor,
                batch: int = 2500) -> dict[str, EKFACEigen]:
    modules = tuned_modules(head)
    acc = EKFACAccumulator(eigs)
    cfg = CurvatureConfig(labels="exact")
    with frozen_parameters(head):
        for xb, yb in _batches(x, y, batch):
            acc.accumulate_batch(modules, lambda xb=xb: head(xb), yb, torch.ones(len(yb), dtype=torch.bool), cfg)
    return acc.result()


def compute_basis(method: str, head: Head, x: torch.Tensor, y: torch.Tensor, threads: int | None = None) -> Basis:
    """The γ-independent decomposition of `method`'s curvature of the mean cross-entropy over (x, y).

    threads: intra-op threads for the dense matrix and its eigh (None: current setting); the K-FAC
    family runs on one thread (its matrices are at most 120×120). Everything is computed in float64 on a
    copy of the head: at γ = 1 − 10⁻⁷ the cutoff eigenvalue (~1e-7 of the largest) is far below float32
    rounding of the matrix entries."""
    t0 = time.perf_counter()
    head = copy.deepcopy(head).double()
    x = x.double()
    if method in ("hessian", "ggn"):
        with num_threads(threads):
            M = exact_matrix(method, head, x, y)
            t1 = time.perf_counter()
            lam, U, n_neg = sym_eigh(M)
        basis: Basis = DenseBasis(lam, U.float(), [p.shape for p in tuned_params(head)], n_neg)
        basis.info = {"matrix_s": t1 - t0, "eigh_s": time.perf_counter() - t1, "negative_eigenvalues": n_neg,
                      "negative_mass_fraction": float((lam.sum() - torch.trace(M)) / lam.sum()) if float(lam.sum()) > 0 else 0.0,
                      "largest_eigenvalue": float(lam[0])}
    elif method in ("kfac", "ekfac", "activation-covariance"):
        with num_threads(1):
            stats = kfac_stats(head, x, y)
            eigs = {k: eigendecompose(s) for k, s in stats.items()}
            if method == "kfac":
                basis = KFACBasis(eigs)
            elif method == "ekfac":
                basis = EKFACBasis(ekfac_eigen(head, eigs, x, y))
            else:
                basis = ActivationBasis(eigs)
    else:
        raise ValueError(f"unknown curvature method {method!r}; expected one of {CURVATURE_METHODS}")
    basis.info["seconds"] = time.perf_counter() - t0
    return basis
