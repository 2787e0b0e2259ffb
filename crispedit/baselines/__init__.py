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

from pathlib import Path
from typing import Any, Sequence

from crispedit.baselines.alphaedit import AlphaEditConfig, run_alphaedit
from crispedit.baselines.keys import check_down_projections, check_subjects
from crispedit.baselines.memit import MemitConfig, run_memit
from crispedit.baselines.mend import MendConfig, read_hypernet_record, run_mend
from crispedit.baselines.ultraedit import UltraEditConfig, run_ultraedit
from crispedit.data.records import EditRequest
from crispedit.editing.delta import EditDelta
from crispedit.errors import CrispEditError

CONFIGS: dict[str, type] = {"alphaedit": AlphaEditConfig, "memit": MemitConfig, "mend": MendConfig,
                            "ultraedit": UltraEditConfig}
METHODS = tuple(sorted(CONFIGS))
NEEDS_CACHE = frozenset({"memit", "alphaedit"})  # key covariance = the cache's A
KEY_VALUE = frozenset({"memit", "alphaedit"})  # subject keys, down-projection targets


def config_class(name: str) -> type:
    """The frozen config dataclass of a method (every field has a default and `metadata["help"]`)."""
    _check_name(name)
    return CONFIGS[name]


def _check_name(name: str) -> None:
    if name not in CONFIGS:
        raise CrispEditError(f"unknown baseline method {name!r}; expected one of {', '.join(METHODS)}")


def _config(name: str, config: Any) -> Any:
    cls = CONFIGS[name]
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise CrispEditError(f"method {name!r} takes a {cls.__name__}, got {type(config).__name__}")
    return config


def _cache_record(curvature: Any) -> dict[str, Any] | None:
    if curvature is None:
        return None
    if isinstance(curvature, (str, Path)):
        from crispedit.curvature.cache import read_record

        return read_record(curvature)
    if isinstance(curvature, dict):
        return curvature
    return curvature.record


def validate(name: str, requests: Sequence[EditRequest] | None = None, config: Any = None, *,
             curvature: Any = None, targets: Sequence[str] | None = None) -> None:
    """Check a baseline run's inputs before any model is loaded; raise `CrispEditError` with one line.

    Args:
        name: method name (`METHODS`).
        requests: the edit requests (subject-based methods need each one's subject inside its prompt).
        config: the method's config (None = defaults).
        curvature: the curvature cache as a folder path, a loaded `Curvature` or its record (None = no cache).
        targets: the layers to edit, if chosen explicitly.
    """
    _check_name(name)
    cfg = _config(name, config)
    record = _cache_record(curvature)
    if name in NEEDS_CACHE and record is None:
        raise CrispEditError(f"method {name!r} needs a curvature cache (--curvature): its key covariance "
                             "E[kkᵀ] is the cache's input factor A")
    if requests is not None:
        if not requests:
            raise CrispEditError("no edit requests given")
        if name in KEY_VALUE:
            check_subjects(requests)
    cache_targets = [t["name"] for t in record["targets"]] if record is not None else None
    chosen = list(targets) if targets is not None else cache_targets
    if name in KEY_VALUE and chosen is not None:
        if cache_targets is not None:
            missing = [t for t in chosen if t not in cache_targets]
            if missing:
                raise CrispEditError(f"target(s) {missing} are not in the curvature cache, which covers "
                                     f"{cache_targets}")
        model_type = (record or {}).get("model", {}).get("model_type")
        check_down_projections(name, chosen, model_type)
    if name == "memit" and record is not None and "counts" in record:
        sink = cfg.covariance == "all_tokens"
        for t in record["targets"]:
            c = record["counts"].get(t["name"], {})
            n = c.get("n", 0) + (c.get("n_sink", 0) if sink else 0)
            if (chosen is None or t["name"] in chosen) and n < t.get("d_in", 0):
                raise CrispEditError(f"the curvature cache holds {n} tokens for {t['name']}, fewer than its "
                                     f"{t['d_in']} inputs: MEMIT's key covariance is singular; collect more text "
                                     "(crispedit curvature --samples)")
    if name == "mend":
        if cfg.hypernet is None:
            raise CrispEditError("method 'mend' needs a trained hypernetwork (MendConfig.hypernet); train one "
                                 "with `python -m crispedit.baselines.mend_train`")
        rec = read_hypernet_record(cfg.hypernet)
        if targets is not None and list(targets) != [t["name"] for t in rec["targets"]]:
            raise CrispEditError(f"{cfg.hypernet} edits {[t['name'] for t in rec['targets']]}, not {list(targets)}")


def run_baseline(name: str, model, tokenizer, requests: Sequence[EditRequest], curvature: Any = None,
                 config: Any = None, *, targets: Sequence[str] | None = None, progress: bool = False) -> EditDelta:
    """Edit `model` in place with baseline `name` and return the delta (apply/revert bit-exact, with record).

    Args:
        name: one of `METHODS`.
        model, tokenizer: the model to edit and its tokenizer.
        requests: edit requests.
        curvature: a loaded `Curvature` or a cache folder (required by memit/alphaedit; optional otherwise,
            where it only adds K-FAC diagnostics and, for ultraedit, the default targets).
        config: the method's config dataclass (None = defaults).
        targets: layers to edit (memit/alphaedit: a subset of the cache's, default all of them; ultraedit: any
            Linear layers, default UltraEdit's own MLP gate/up layers scaled to the model's depth, not the
            cache's; mend: those of the hypernetwork).

    Raises:
        CrispEditError: bad input (see `validate`), or a non-finite update (the weights are then restored).
    """
    validate(name, requests, config, curvature=curvature, targets=targets)
    cfg = _config(name, config)
    if isinstance(curvature, (str, Path)):
        from crispedit.curvature.api import Curvature

        curvature = Curvature.load(curvature, model=model)
    if name == "memit":
        return run_memit(model, tokenizer, requests, curvature, cfg, targets, progress)
    if name == "alphaedit":
        return run_alphaedit(model, tokenizer, requests, curvature, cfg, targets, progress)
    if name == "ultraedit":
        from crispedit.baselines.ultraedit import default_ultraedit_targets
        from crispedit.models.targets import resolve_targets

        targets = default_ultraedit_targets(model) if targets is None else resolve_targets(model, list(targets))
        return run_ultraedit(model, tokenizer, requests, targets, cfg, curvature, progress)
    return run_mend(model, tokenizer, requests, cfg, curvature, progress=progress)


__all__ = ["AlphaEditConfig", "KEY_VALUE", "METHODS", "MemitConfig", "MendConfig", "NEEDS_CACHE",
           "UltraEditConfig", "check_down_projections", "config_class", "run_baseline", "validate"]
