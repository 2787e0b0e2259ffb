"""Adam with the low-curvature constraint built in.

Three ways to combine Adam with a projector P onto the kept subspace:

- `eigen` (default): Adam runs in the rotated coordinates X̃ = U_Sᵀ X U_A of the Kronecker eigenbasis, on the
  masked gradient G̃ ⊙ M; the masked step is rotated back. Adam's element-wise scaling acts on eigen-
  coordinates, and a diagonal mask commutes with element-wise operations, so every step lies exactly in the
  kept subspace and the moments never see the forbidden components.
- `update`: plain Adam on the raw gradient, then the update is projected: the step stays in the subspace
  but the moments are polluted by the removed gradient components.
- `grad` (the authors' code): project the gradient, then plain Adam. Adam's element-wise normalisation in
  raw weight coordinates does not commute with P, so the actual step leaves the subspace (we measured it).

For FT (no projector) all three are plain Adam.

Second moment per coordinate (`scale="coordinate"`, Adam) or per target (`scale="layer"`): Adam divides every
coordinate by its own gradient RMS, so each kept coordinate moves about lr per step whether the edit needs it
much or not; with one second moment per target the step is the momentum divided by its layer's gradient RMS over
the kept coordinates (the same lr per coordinate on average, spread as the gradient is). Measured at 300
CounterFact edits, both end with the same ‖ΔW‖ and the same Gaussian-like spread over the kept eigen-coordinates:
there the gradient itself is spread that way, and the layer scale is no cheaper (docs/scale.md, "The path's length").
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

MODES = ("eigen", "update", "grad")
SCALES = ("coordinate", "layer")


class ProjectedAdam:
    def __init__(self, shapes: Mapping[str, tuple[int, int]], projectors: Mapping[str, Any] | None,
                 lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 mode: str = "eigen", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 scale: str = "coordinate"):
        if mode not in MODES:
            raise ValueError(f"unknown projection mode {mode!r}; expected one of {MODES}")
        if scale not in SCALES:
            raise ValueError(f"unknown second-moment scale {scale!r}; expected one of {SCALES}")
        self.projectors = dict(projectors or {})
        self.lr, self.betas, self.eps, self.mode = lr, betas, eps, mode
        self.t = 0
        self.m = {k: torch.zeros(s, device=device, dtype=dtype) for k, s in shapes.items()}
        self.scale = scale
        vshape = {k: (s if scale == "coordinate" else ()) for k, s in shapes.items()}
        self.v = {k: torch.zeros(s, device=device, dtype=dtype) for k, s in vshape.items()}
        # coordinates a step can move: the kept ones in the eigenbasis (`eigen`), every one otherwise
        self.free = {k: (s[0] * s[1]) * (self.projectors[k].kept_fraction
                                         if k in self.projectors and mode == "eigen" else 1.0)
                     for k, s in shapes.items()}

    def _adam(self, name: str, g: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        m, v = self.m[name], self.v[name]
        m.mul_(b1).add_(g, alpha=1 - b1)
        if self.scale == "layer":  # mean square over the coordinates the step can move
            v.mul_(b2).add_(g.square().sum() / max(self.free[name], 1.0), alpha=1 - b2)
        else:
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        c1 = 1 - b1**self.t
        c2 = 1 - b2**self.t
        return (m / c1) / ((v / c2).sqrt_().add_(self.eps)) * self.lr

    def step(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the update Δ (to subtract from each weight) for the given gradients."""
        self.t += 1
        out = {}
        for name, g in grads.items():
            g = g.to(self.m[name].dtype)
            P = self.projectors.get(name)
            if P is None:
                out[name] = self._adam(name, g)
            elif self.mode == "eigen":
                out[name] = P.unrotate_masked(self._adam(name, P.rotate_masked(g)))
            elif self.mode == "update":
                out[name] = P(self._adam(name, g))
            else:
                out[name] = self._adam(name, P(g))
        return out

    def apply(self, grads: Mapping[str, torch.Tensor], deltas: dict[str, torch.Tensor], decay: float = 0.0) -> None:
        """One step: shrink each target's ΔW by the share lr·`decay` (decoupled, as AdamW; a scaled ΔW stays in
        the kept subspace), then subtract the (projected) Adam update, in place."""
        for name, u in self.step(grads).items():
            if decay:
                deltas[name].mul_(1.0 - self.lr * decay)
            deltas[name] -= u

