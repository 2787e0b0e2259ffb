"""crispedit: edit language models inside the low-curvature subspace of their capabilities (CrispEdit).

The public API, one call per stage, each configured by one config object::

    from crispedit import CurvatureConfig, EditConfig, build_corpus, collect_curvature, edit_model, load_model

    model, tok = load_model("smollm2-135m-instruct")
    corpus = build_corpus(tok, n_samples=200, max_length=256)          # capability text (Wikipedia excerpt)
    cur = collect_curvature(model, corpus, CurvatureConfig())          # K-FAC of the default target layers
    res = edit_model(model, tok, load_requests("edits.json"), cur, EditConfig(gamma=0.9))
    res.delta.save("delta/"); res.delta.revert(model)                  # bit-exact revert
    delta = run_baseline("memit", model, tok, load_requests("edits.json"), cur)  # a baseline: same delta, record
    res = edit_model(model, tok, requests, cur, MemitConfig())        # the same, through edit_model
                                                                       # (configs: crispedit.baselines.config)
    report = evaluate(model, base, tok, requests, heldout, EvalConfig())

Names are imported lazily, so `import crispedit` (and the `crispedit` command's `--help`) stays instant;
everything in `__all__` is importable from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    # configuration (torch-free)
    "CorpusConfig": "crispedit.config",
    "CurvatureConfig": "crispedit.config",
    "EditConfig": "crispedit.config",
    "EvalConfig": "crispedit.config",
    "Labels": "crispedit.config",
    "LoadConfig": "crispedit.config",
    "Method": "crispedit.config",
    # errors and warnings
    "CacheMismatchError": "crispedit.errors",
    "ConfigError": "crispedit.errors",
    "CrispEditError": "crispedit.errors",
    "CrispEditWarning": "crispedit.errors",
    # data
    "EditRequest": "crispedit.data.records",
    "build_corpus": "crispedit.data.corpus",
    "load_requests": "crispedit.data.readers",
    # models
    "load_model": "crispedit.models.loading",
    "resolve_targets": "crispedit.models.targets",
    # curvature
    "Curvature": "crispedit.curvature.api",
    "collect_curvature": "crispedit.curvature.api",
    # editing
    "EditDelta": "crispedit.editing.delta",
    "EditResult": "crispedit.editing.engine",
    "edit_model": "crispedit.editing.run",
    "run_baseline": "crispedit.baselines.api",  # MEMIT, AlphaEdit, UltraEdit, MEND (configs in crispedit.baselines)
    # evaluation
    "EvalReport": "crispedit.evaluation.report",
    "evaluate": "crispedit.evaluation.runner",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # what type checkers and IDEs see
    from crispedit.baselines.api import run_baseline
    from crispedit.config import CorpusConfig, CurvatureConfig, EditConfig, EvalConfig, Labels, LoadConfig, Method
    from crispedit.curvature.api import Curvature, collect_curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.data.records import EditRequest
    from crispedit.editing.delta import EditDelta
    from crispedit.editing.engine import EditResult
    from crispedit.editing.run import edit_model
    from crispedit.errors import CacheMismatchError, ConfigError, CrispEditError, CrispEditWarning
    from crispedit.evaluation.report import EvalReport
    from crispedit.evaluation.runner import evaluate
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'crispedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
