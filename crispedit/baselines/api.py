"""`validate` (before any model is loaded) and `run_baseline` (edit in place, return the delta): the baselines' two
entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from crispedit.baselines.alphaedit import run_alphaedit
from crispedit.baselines.config import CONFIGS, KEY_VALUE, METHODS, NEEDS_CACHE
from crispedit.baselines.keys import check_down_projections, check_subjects
from crispedit.baselines.memit import run_memit
from crispedit.baselines.mend import read_hypernet_record, run_mend
from crispedit.baselines.ultraedit import run_ultraedit
from crispedit.data.records import EditRequest
from crispedit.editing.delta import EditDelta
from crispedit.errors import CrispEditError


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


def expand_names(targets: Any) -> list[str] | None:
    """Layer names from a target spec without a model (a list of names, or a string of comma-separated names and
    `{10-12}` templates); None when the spec needs the model to resolve (a regex) or is None."""
    if targets is None:
        return None
    from crispedit.models.targets import _is_regex, expand_template, split_target_items

    items = split_target_items(targets) if isinstance(targets, str) else [str(t) for t in targets]
    if any(_is_regex(i) for i in items):
        return None
    return [name for item in items for name in expand_template(item)]


def validate(name: str, requests: Sequence[EditRequest] | None = None, config: Any = None, *,
             curvature: Any = None, targets: Any = None, source: str | None = None) -> None:
    """Check a baseline run's inputs before any model is loaded; raise `CrispEditError` with one line.

    Args:
        name: method name (`METHODS`).
        requests: the edit requests (subject-based methods need each one's subject inside its prompt).
        config: the method's config (None = defaults).
        curvature: the curvature cache as a folder path, a loaded `Curvature` or its record (None = no cache).
        targets: the layers to edit, if chosen explicitly: names or a spec string (a regex is checked only once
            the model resolves it, in `run_baseline`).
        source: where the requests came from (a file name), put before the messages about a request.
    """
    _check_name(name)
    cfg = _config(name, config)
    record = _cache_record(curvature)
    where = f"the curvature cache {curvature}" if isinstance(curvature, (str, Path)) else "the curvature cache"
    if name in NEEDS_CACHE and record is None:
        raise CrispEditError(f"method {name!r} needs a curvature cache: its key covariance E[kkᵀ] is the cache's "
                             "input factor A", hint={"curvature": ...})
    if requests is not None:
        if not requests:
            raise CrispEditError(f"{source}: no edit requests" if source else "no edit requests given")
        if name in KEY_VALUE:
            try:
                check_subjects(requests)
            except CrispEditError as e:
                if source is None:
                    raise
                raise CrispEditError(f"{source}: {e}") from None
    cache_targets = [t["name"] for t in record["targets"]] if record is not None else None
    asked = expand_names(targets)
    chosen = asked if targets is not None else cache_targets
    if name in KEY_VALUE and chosen is not None:
        model_type = (record or {}).get("model", {}).get("model_type")
        try:
            check_down_projections(name, chosen, model_type)
        except CrispEditError as e:
            if targets is not None:
                raise
            raise CrispEditError(f"{where} targets {cache_targets}: {e}") from None
        if cache_targets is not None:
            missing = [t for t in chosen if t not in cache_targets]
            if missing:
                raise CrispEditError(f"target(s) {missing} are not in {where}, which covers {cache_targets}")
    if name == "memit" and record is not None and "counts" in record:
        sink = cfg.covariance == "all_tokens"
        for t in record["targets"]:
            c = record["counts"].get(t["name"], {})
            n = c.get("n", 0) + (c.get("n_sink", 0) if sink else 0)
            if (chosen is None or t["name"] in chosen) and n < t.get("d_in", 0):
                raise CrispEditError(f"{where} holds {n} tokens for {t['name']}, fewer than its {t['d_in']} "
                                     "inputs: MEMIT's key covariance is singular; collect more text (crispedit "
                                     "curvature --samples)")
    if name == "mend":
        if cfg.hypernet is None:
            raise CrispEditError("method 'mend' needs a trained hypernetwork (MendConfig.hypernet); train one "
                                 "with `python -m crispedit.baselines.mend_train`")
        rec = read_hypernet_record(cfg.hypernet)
        if asked is not None and asked != [t["name"] for t in rec["targets"]]:
            raise CrispEditError(f"{cfg.hypernet} edits {[t['name'] for t in rec['targets']]}, not {asked}")


def run_baseline(name: str, model, tokenizer, requests: Sequence[EditRequest], curvature: Any = None,
                 config: Any = None, *, targets: Any = None, progress: bool = False) -> EditDelta:
    """Edit `model` in place with baseline `name` and return the delta (apply/revert bit-exact, with record).

    Args:
        name: one of `METHODS`.
        model, tokenizer: the model to edit and its tokenizer.
        requests: edit requests.
        curvature: a loaded `Curvature` or a cache folder (required by memit/alphaedit; optional otherwise,
            where it only adds K-FAC diagnostics and, for ultraedit, the default targets).
        config: the method's config dataclass (None = defaults).
        targets: layers to edit, as names or a spec (`crispedit.models.targets.resolve_targets`) (memit/alphaedit: a subset of the cache's, default all of them; ultraedit: any
            Linear layers, default UltraEdit's own MLP gate/up layers scaled to the model's depth, not the
            cache's; mend: those of the hypernetwork).

    Raises:
        CrispEditError: bad input (see `validate`), or a non-finite update (the weights are then restored).
    """
    if targets is not None:
        from crispedit.models.targets import resolve_targets

        targets = resolve_targets(model, targets if isinstance(targets, str) else list(targets))
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

        targets = default_ultraedit_targets(model) if targets is None else targets
        return run_ultraedit(model, tokenizer, requests, targets, cfg, curvature, progress)
    return run_mend(model, tokenizer, requests, cfg, curvature, progress=progress)
