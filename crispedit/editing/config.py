"""Editing hyper-parameters (recorded verbatim in every delta)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("crispedit", "ft", "adam-nscl")


@dataclass(frozen=True)
class EditConfig:
    """Defaults: the paper's Table 2 (Adam, lr 5e-4, batch 32, ≤25 epochs, stop when the epoch-mean edit loss
    < 0.01) except where measured otherwise on the embedded model — see the README's results section."""

    method: str = "crispedit"
    gamma: float = 0.99
    scope: str = "layer"
    projection_mode: str = "eigen"
    lr: float = 1e-3
    epochs: int = 25
    batch_size: int = 32
    early_stop_loss: float = 0.01
    max_steps: int | None = None
    context: str = "raw"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, epochs and batch size >= 1")
        if self.context not in ("raw", "chat"):
            raise ValueError(f"edit context must be 'raw' or 'chat', got {self.context!r}")

    def to_json(self) -> dict:
        return asdict(self)
