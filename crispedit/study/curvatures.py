"""The capability-curvature bases compared by the study and their γ-approximate null-space projectors.

A *basis* is the γ-independent part (an eigendecomposition at the current parameters θ); `projector(γ)`
derives the projector for one γ, so one decomposition at θ0 serves every γ of the sweep.

Fine-tuned parameters: the weights of the head's fc2 and fc3 (biases frozen), flattened row-major in that
order — the same vec(W) order as K-FAC's S ⊗ A blocks and as curvlinops' parameter list.

- hessian / ggn: the exact matrices of the mean MNIST cross-entropy (crispedit.study.exact: closed-form
  products, exact trace, live-coordinate block), eigenvalues clamped at 0; the γ-approximate null space
  removes the top eigenvectors holding γ of the eigenvalue sum (paper, eq. 3), one cutoff over all
  parameters. The removed subspace comes from Lanczos when it is small and from a dense eigh of the live
  block when it is not (crispedit.study.spectrum); curvlinops' operators are the tests' oracle.
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
from crispedit.curvature.eigen import LayerEigen, eigendecompose
from crispedit.curvature.ekfac import EKFACAccumulator, EKFACEigen, ekfac_masks
from crispedit.curvature.energy import energy_cutoff_values
from crispedit.curvature.masks import build_masks
from crispedit.curvature.projector import InputNullspaceProjector, KroneckerProjector
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.models.runtime import frozen_parameters
from crispedit.study.exact import HeadCurvature
from crispedit.study.lenet import Head
from crispedit.study.spectrum import Spectrum, lanczos_for_gamma, lanczos_top, removed_count, tridiagonal_partial

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
    """P g over the flattened weights: the dead coordinates (zero curvature) pass unchanged; on the live
    block either g − U Uᵀ g (U: the removed eigenvectors) or U Uᵀ g (U: the kept ones), whichever U is
    narrower among those computed."""

    live: torch.Tensor  # bool (d,)
    U: torch.Tensor  # (d_live, c) float32, orthonormal columns
    removed: bool  # True: U holds the removed directions
    n_removed: int
    shapes: list[torch.Size]

    @property
    def kept_fraction(self) -> float:
        d = self.live.numel()
        return (d - self.n_removed) / d if d else 1.0

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        g = torch.cat([x.reshape(-1) for x in grads]).to(self.U.dtype)
        gl = g[self.live]
        c = self.U.T @ gl
        g[self.live] = gl - self.U @ c if self.removed else self.U @ c
        out, i = [], 0
        for s, x in zip(self.shapes, grads):
            n = math.prod(s)
            out.append(g[i:i + n].reshape(s).to(x.dtype))
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
    """Part of an exact curvature's spectrum on the live coordinates (see crispedit.study.spectrum)."""

    spectrum: Spectrum
    live: torch.Tensor  # bool (d,)
    shapes: list[torch.Size]
    info: dict = field(default_factory=dict)
    _U32: torch.Tensor | None = field(default=None, repr=False)

    @property
    def lam(self) -> torch.Tensor:
        return self.spectrum.lam

    def n_removed(self, gamma: float) -> int:
        r = self.spectrum.n_removed(gamma)
        if r is None:
            raise ValueError(f"this {self.spectrum.solver} decomposition ({self.spectrum.lam.numel()} eigenvalues) "
                             f"does not decide γ = {gamma}")
        return r

    def projector(self, gamma: float) -> DenseProjector:
        if self._U32 is None:
            self._U32 = self.spectrum.U.float()
        V, removed, r = self.spectrum.vectors(gamma)
        lo = self.spectrum.U.shape[1] - V.shape[1] if not removed else 0
        U = self._U32[:, lo:lo + V.shape[1]].contiguous()
        return DenseProjector(self.live, U, removed, r, self.shapes)


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


# Lanczos is asked for at most n_live / LANCZOS_FRACTION[kind] eigenpairs; beyond that the tridiagonal
# route is cheaper. Measured on the 84-unit head at θ0 (n_live = 5,664, one thread, load ~6 on 2 cores):
# GGN Lanczos 1.0 / 3.8 / 22 / 96 s for r = 30 / 155 / 443 / 969; tridiagonal route 40–65 s for any r
# (dsytrd 29 s). The Hessian's Lanczos route also needs all eigenvalues (eigvalsh, ~17 s), so it pays only
# for its few smallest r.
LANCZOS_FRACTION = {"ggn": 10, "hessian": 30}


def lanczos_max(n_live: int, kind: str = "ggn") -> int:
    """Largest number of eigenpairs asked of Lanczos for an n_live block before the tridiagonal route."""
    return max(16, n_live // LANCZOS_FRACTION[kind])


def exact_basis(kind: str, head: Head, x: torch.Tensor, y: torch.Tensor, gammas: tuple[float, ...],
                hint: int | None = None, cap: int | None = None) -> DenseBasis:
    """The removed subspace of the exact GGN / Hessian for every γ in `gammas`.

    hint: how many directions the largest γ removed at the previous decomposition (None: unknown). With a
    hint of at most `cap` (default `lanczos_max`) only the top eigenpairs are computed (Lanczos; for the
    Hessian after one eigvalsh for its total); otherwise, or when Lanczos would need more than `cap`, the
    live block goes the tridiagonal route, which serves every γ ≤ max(gammas)."""
    t0 = time.perf_counter()
    hc = HeadCurvature(kind, head, x, y)
    n, gmax = hc.d_live, max(gammas)
    cap = lanczos_max(n, kind) if cap is None else min(int(cap), n - 1)
    spec: Spectrum | None = None
    info: dict = {"kind": kind, "n_live": n, "n": hc.d}
    if kind == "ggn":
        total = hc.trace()
        if hint is not None and hint <= cap:
            spec = lanczos_for_gamma(hc.matmat, n, total, gmax, m0=int(1.25 * hint) + 16, max_m=cap)
        if spec is None:
            spec = tridiagonal_partial(hc.dense(), gammas)
            info["trace_check"] = abs(spec.total - total) / max(total, 1e-300)
    else:
        M = hc.dense()
        if hint is not None and hint <= cap:
            lam_all = torch.linalg.eigvalsh(M).flip(0)
            lam = lam_all.clamp_min(0.0)
            total = float(lam.sum())
            r = removed_count(lam, total, gmax)
            if r + 8 <= cap:
                spec = lanczos_top(hc.matmat, n, r + 8, total)
                if spec.n_removed(gmax) != r:  # Lanczos disagrees with the dense eigenvalues: trust neither
                    spec = None
                else:
                    neg = lam_all[lam_all < 0]
                    spec.n_negative, spec.negative_mass = int(neg.numel()), float(-neg.sum())
        if spec is None:
            spec = tridiagonal_partial(M, gammas)
        del M
    info.update(solver=spec.solver, eigenvectors=int(spec.U.shape[1]), largest_eigenvalue=float(spec.lam[0]),
                total=spec.total, removed={f"{g:.10g}": spec.n_removed(g) for g in gammas},
                seconds=time.perf_counter() - t0)
    if spec.n_negative is not None:
        info.update(negative_eigenvalues=spec.n_negative,
                    negative_mass_fraction=spec.negative_mass / spec.total if spec.total > 0 else 0.0)
    return DenseBasis(spec, hc.live_mask(), list(hc.full_shapes), info)


def compute_basis(method: str, head: Head, x: torch.Tensor, y: torch.Tensor, threads: int | None = None,
                  gammas: tuple[float, ...] = (1 - 1e-7,), hint: int | None = None) -> Basis:
    """The decomposition of `method`'s curvature of the mean cross-entropy over (x, y) that serves every γ
    in `gammas` (the K-FAC family always serves every γ; `hint` is for the exact ones, see exact_basis).

    threads: intra-op threads for the exact matrices (None: current setting); the K-FAC family runs on one
    thread (its matrices are at most 120×120). Everything is computed in float64 on a copy of the head:
    at γ = 1 − 10⁻⁷ the cutoff eigenvalue (~1e-9 of the largest) is far below float32 rounding."""
    t0 = time.perf_counter()
    head = copy.deepcopy(head).double()
    x = x.double()
    if method in ("hessian", "ggn"):
        with num_threads(threads):
            basis: Basis = exact_basis(method, head, x, y, gammas, hint)
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
