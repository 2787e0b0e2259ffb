"""A constraint that follows the edit: the capability curvature collected again at the current weights.

The projection keeps every step in the low-curvature subspace of the capability loss's Gauss-Newton matrix
*at the base weights*, one target layer at a time. That holds while the change is small. With several edited
layers and hundreds of edits it is not: each layer's curvature was taken with the layers below at their base
weights, and once those have moved, the upper layers see inputs their factors never described (docs/scale.md: at
300 CounterFact edits the joint change of six layers costs 15× the KL of their single-layer changes, with a
cliff between half the change and the whole). Collecting the curvature again, on the same text, at the
weights reached so far, lets the rest of the edit see the others' change.

The Gauss-Newton matrix of KL(p_base ‖ p_θ) at θ is Jᵀ(diag p_θ − p_θ p_θᵀ)J with the Jacobian at θ: the
softmax's Hessian does not depend on the target distribution. So the recollected factors (labels sampled from
the current model) are exactly that matrix's K-FAC, with the first-order term of the KL left out.

Measured (docs/scale.md, 300 CounterFact edits, 3 recollections): the held-out KL does not fall (0.172 at three layers,
as without; 0.975 against 0.862 at six), and the changes grow. The first-order term, zero at the base and not
zero once the weights have moved, is the likely reason; so this stays an option, off by default.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from crispedit.editing.config import EditConfig
from crispedit.errors import CrispEditError

logger = logging.getLogger(__name__)


def relinearization_steps(budget: int, times: int) -> list[int]:
    """The steps after which the curvature is collected again: `times` points evenly inside a budget of
    `budget` steps (k·budget/(times+1), k = 1..times, rounded; repeats and the ends dropped)."""
    marks = sorted({round(k * budget / (times + 1)) for k in range(1, times + 1)})
    return [m for m in marks if 0 < m < budget]


class Relinearizer:
    """Recollects a curvature cache's statistics, on the cache's own sequences and collection settings, at the
    model's current weights, and records each time it did."""

    def __init__(self, tokenizer, curvature, targets: Sequence[str], cfg: EditConfig, pad_id: int):
        from crispedit.curvature.extend import curvature_sequences

        if curvature is None:
            raise CrispEditError("relinearize needs a curvature cache (it collects the cache's statistics again)")
        self.curvature, self.targets, self.cfg, self.pad_id = curvature, list(targets), cfg, pad_id
        self.sequences = curvature_sequences(tokenizer, curvature.record, "the curvature to relinearize")
        self.steps: list[int] = []
        self.rounds: list[dict[str, Any]] = []

    def plan(self, budget: int) -> None:
        """Spread the recollections over a run of `budget` steps."""
        self.steps = relinearization_steps(budget, self.cfg.relinearize)

    def due(self, step: int) -> bool:
        return step in self.steps

    def projectors(self, model, step: int, device) -> dict[str, Any]:
        """The projectors of the curvature collected at `model`'s current weights (after step `step`)."""
        from crispedit.curvature.api import Curvature
        from crispedit.curvature.collect import collect_lm_stats

        t0 = time.perf_counter()
        stats = collect_lm_stats(model, self.sequences, self.targets, self.curvature.config, pad_id=self.pad_id,
                                 desc="relinearize")
        cur = Curvature.from_stats(stats, dict(self.curvature.record))
        projs = cur.projectors(self.cfg.gamma, self.cfg.scope, kind=self.cfg.projection, device=device)
        seconds = time.perf_counter() - t0
        self.rounds.append({"after_step": step, "seconds": round(seconds, 2),
                            "kept_fraction": {n: float(p.kept_fraction) for n, p in projs.items()}})
        logger.info("relinearized after step %d: curvature of %d sequences collected again in %.1f s", step,
                    len(self.sequences), seconds)
        return projs

    def describe(self) -> dict[str, Any]:
        return {"planned_after_steps": self.steps, "rounds": self.rounds, "sequences": len(self.sequences)}
