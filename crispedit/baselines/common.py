"""What every baseline editor shares: config checks, the in-place weight bookkeeping and the delta's record.

Each editor writes its update as float32 ΔW per target and materialises `base + ΔW` with the same
`materialize` the fine-tuning engine uses, so the `EditDelta` it returns applies to and reverts from the
base model bit-exactly, and records the same keys as `crispedit.editing.engine.edit` (base fingerprint,
requests fingerprint, config, seconds, diagnostics) plus the method's own timings.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

from crispedit.data.records import EditRequest
from crispedit.editing.delta import EditDelta, materialize
from crispedit.errors import CrispEditError
from crispedit.models.targets import weight_matrix

T = TypeVar("T")


def config_json(method: str, cfg: Any) -> dict[str, Any]:
    """The config as the delta records it: the method name and every field (plain JSON values)."""
    return {"method": method, **cfg.to_dict()}


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF-style labels (label[t] = token at t, −100 = ignore) as per-position targets: position t predicts
    label[t+1]; the last position predicts nothing (−100)."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


def chunks(items: Sequence[T], size: int | None) -> list[Sequence[T]]:
    """`items` in consecutive chunks of `size` (one chunk when `size` is None)."""
    if size is None or size >= len(items):
        return [items]
    return [items[i : i + size] for i in range(0, len(items), size)]


class WeightEditor:
    """Holds the base weights of the targets and the running float32 ΔW; writes `base + ΔW` into the model.

    Used as a context manager: an exception (including KeyboardInterrupt) restores the base weights.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str]):
        from crispedit.models.fingerprint import weights_fingerprint

        self.model = model
        self.targets = list(targets)
        self.modules = {n: model.get_submodule(n) for n in self.targets}
        self.base = {n: weight_matrix(m).clone() for n, m in self.modules.items()}
        self.base_fingerprint = weights_fingerprint(model, self.targets)
        self.deltas = {n: torch.zeros(b.shape, dtype=torch.float32, device=b.device) for n, b in self.base.items()}

    def add_(self, name: str, update: torch.Tensor) -> None:
        """ΔW[name] += update (any dtype, `[d_out, d_in]`), and write the edited weight into the model."""
        if not torch.isfinite(update).all():
            raise CrispEditError(f"the update of {name} is not finite (NaN or inf); the weights were restored")
        d = self.deltas[name]
        d += update.to(device=d.device, dtype=torch.float32)
        with torch.no_grad():
            weight_matrix(self.modules[name]).copy_(materialize(self.base[name], d))

    def current(self, name: str) -> torch.Tensor:
        return weight_matrix(self.modules[name])

    def restore(self) -> None:
        with torch.no_grad():
            for n, m in self.modules.items():
                weight_matrix(m).copy_(self.base[n])

    def __enter__(self) -> "WeightEditor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.restore()

    def finish(self, requests: Sequence[EditRequest], method: str, cfg: Any, seconds: float,
               timings: Mapping[str, float], curvature=None, extra: Mapping[str, Any] | None = None) -> EditDelta:
        """The `EditDelta` of everything added so far, with the engine's record keys plus the method's."""
        from crispedit.data.readers import requests_fingerprint

        record: dict[str, Any] = {
            "method": method,
            "base_weights_sha256": self.base_fingerprint,
            "requests_sha256": requests_fingerprint(list(requests)),
            "n_requests": len(requests),
            "config": config_json(method, cfg),
            "seconds": seconds,
            "timings": {k: float(v) for k, v in timings.items()},
        }
        record.update(extra or {})
        delta = EditDelta.from_base(self.model, self.base, self.deltas, record)
        delta.record["diagnostics"] = diagnostics(delta.deltas, self.base, curvature)
        return delta


def diagnostics(deltas: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], curvature=None
                ) -> dict[str, Any]:
    """Per target: ‖ΔW‖, ‖ΔW‖/‖W‖ and, where the curvature covers it, the K-FAC predicted capability loss
    increase ½ Σ (S ΔW A) ⊙ ΔW with the sink-inclusive A (the same quantity the engine reports)."""
    out: dict[str, Any] = {}
    for n, d in deltas.items():
        d64 = d.double().cpu()
        row: dict[str, Any] = {"norm": float(d64.norm()),
                               "relative_norm": float(d64.norm() / base[n].double().cpu().norm().clamp_min(1e-300))}
        if curvature is not None and n in curvature.targets:
            _, S = curvature.stats[n].factors()
            A = curvature.stats[n].full_input_factor()
            row["kfac_quadratic_form"] = 0.5 * float(((S.cpu() @ d64 @ A.cpu()) * d64).sum())
        out[n] = row
    return out


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (float64 models keep float64, so tiny-model tests are exact)."""
    return x if x.dtype == torch.float64 else x.float()


class Timer:
    """Named wall-clock sections: `with timer("values"): ...`; `timer.totals` sums repeats."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) and every parameter frozen while a baseline computes its update (gradients are
    taken with respect to activations or hypernetwork parameters only); both restored on exit."""
    from crispedit.models.runtime import frozen_parameters

    training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            yield model
    finally:
        model.train(training)
