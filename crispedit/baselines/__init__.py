"""Baseline editors of the paper's comparison that are not fine-tuning loops: MEMIT, AlphaEdit (closed-form,
locate-then-edit), UltraEdit (closed-form lifelong) and MEND (hypernetwork).

One entry point, `run_baseline(name, model, tokenizer, requests, curvature, config)`, edits the model in
place and returns an `EditDelta` whose record has the keys `crispedit.editing.engine.edit` writes (base
fingerprint, requests fingerprint, config, seconds, diagnostics) plus the method's timings. `validate(...)`
checks a run's inputs without a model (cache present, subjects present and found, down-projection targets,
hypernetwork file readable), so a command line can fail in one line before loading anything.

MEMIT and AlphaEdit take their key covariance E[kkᵀ] from the curvature cache (its input factor A, with the
first-token "attention sink" included, as MEMIT's statistics include every token): one cache serves
CrispEdit and these baselines.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it (imported on first use, so the CLI's parser stays torch-free).
_EXPORTS = {
    "AlphaEditConfig": "crispedit.baselines.config",
    "KEY_VALUE": "crispedit.baselines.config",
    "METHODS": "crispedit.baselines.config",
    "MemitConfig": "crispedit.baselines.config",
    "MendConfig": "crispedit.baselines.config",
    "NEEDS_CACHE": "crispedit.baselines.config",
    "UltraEditConfig": "crispedit.baselines.config",
    "check_down_projections": "crispedit.baselines.keys",
    "config_class": "crispedit.baselines.api",
    "run_baseline": "crispedit.baselines.api",
    "validate": "crispedit.baselines.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'crispedit.baselines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
