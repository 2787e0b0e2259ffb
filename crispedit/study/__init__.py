"""Controlled study (paper §4.1, Figure 3): LeNet-5 MNIST → Fashion-MNIST with projected fine-tuning onto the
γ-approximate null space of exact (Hessian, Gauss-Newton) and approximate (K-FAC, EK-FAC, activation
covariance) capability curvatures. Entry point: `run_study` (CLI: `crispedit study mnist`)."""

from __future__ import annotations

__all__ = ["run_study"]


def run_study(*args, **kwargs):
    """See crispedit.study.sweep.run_study (imported lazily: it pulls in torch and curvlinops)."""
    from crispedit.study.sweep import run_study as _run

    return _run(*args, **kwargs)
