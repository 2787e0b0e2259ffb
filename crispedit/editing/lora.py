"""LoRA through the same edit loop: ΔW = s·B·A per target (s = α / r), B and A trained with Adam.

The loop differentiates the edit loss with respect to the edited weight W = W₀ + s·B·A and hands this optimiser
G = ∂L/∂W; the adapters' gradients follow by the chain rule, ∂L/∂B = s·G·Aᵀ and ∂L/∂A = s·Bᵀ·G, so LoRA shares the
loss, the batches, the cached prefix and the delta format of every other gradient method, and differs from FT only
in its parametrisation. Initialisation as in PEFT's LoRA layers: A Kaiming-uniform (a = √5, i.e. U(±1/√d_in)),
B = 0, so the first step starts from ΔW = 0.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


class LoRAAdam:
    """Adam on low-rank factors; `apply` writes the new ΔW = s·B·A into the loop's deltas."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int = 8, alpha: float = 16.0,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        self.scale = alpha / rank
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        gen = torch.Generator().manual_seed(seed)
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for name, (d_out, d_in) in shapes.items():
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on a [rank, d_in] weight
            self.A[name] = ((torch.rand(rank, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(
                device=device, dtype=dtype)
            self.B[name] = torch.zeros(d_out, rank, device=device, dtype=dtype)
        self.m = {k: torch.zeros_like(v) for k, v in {**_tag(self.A, "A"), **_tag(self.B, "B")}.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.m.items()}

    def delta(self, name: str) -> torch.Tensor:
        return self.scale * (self.B[name] @ self.A[name])

    def _adam(self, key: str, g: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        m, v = self.m[key], self.v[key]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        return (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt_().add_(self.eps)) * self.lr

    def apply(self, grads: Mapping[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> None:
        """One Adam step on (A, B) from G = ∂L/∂W of each target; `deltas[name]` becomes s·B·A."""
        self.t += 1
        for name, G in grads.items():
            G = G.to(self.A[name].dtype)
            gB = self.scale * (G @ self.A[name].T)
            gA = self.scale * (self.B[name].T @ G)
            self.B[name] -= self._adam(f"B.{name}", gB)
            self.A[name] -= self._adam(f"A.{name}", gA)
            deltas[name].copy_(self.delta(name))


def _tag(d: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in d.items()}
