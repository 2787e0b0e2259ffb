"""One edit job end to end (the library call behind `crispedit edit`): read the curvature, edit (batch or
sequential), and write the output folder atomically:

    OUT/delta/      ΔW per target (safetensors) + record (applies to / reverts from the base bit-exactly)
    OUT/model/      the edited model (save_pretrained; the input model is never written)
    OUT/run.json    configuration, curvature facts, losses, timings, diagnostics

`edit_model` is the in-memory call (no files): edit a model under a `Curvature` and get the delta back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crispedit.config import AUTO_ALL_FROM, LAYERS_HELP, EditConfig, EditStatistics, option
from crispedit.data.readers import check_requests_fit, max_positions
from crispedit.data.records import EditRequest
from crispedit.errors import ConfigError, CrispEditError
from crispedit.io import atomic_dir, check_apart_from_inputs, check_output_folder

OUTPUT_KIND = "edit-output"

if TYPE_CHECKING:
    from crispedit.curvature.api import Curvature
    from crispedit.editing.engine import EditResult

logger = logging.getLogger(__name__)
RUN_RECORD = "run.json"
DELTA_DIR = "delta"
MODEL_DIR = "model"


@dataclass
class EditJob:
    """What `run_edit` does: the requests, the hyper-parameters, and the run's options (each documented field
    is also a `crispedit edit` flag)."""

    requests: Sequence[EditRequest]
    cfg: EditConfig
    curvature_path: str | None = option(None, "curvature cache (needed by crispedit and adam-nscl)",
                                        flag="--curvature", metavar="CACHE")
    targets: Any = option(None, LAYERS_HELP + " (FT without a cache)", flag="--layers", metavar="SPEC",
                          type=str | None)
    sequential: bool = option(False, "CrispEdit-Seq: edit in chunks, each chunk's statistics become constraints")
    chunk_size: int = option(100, "sequential: edit requests per chunk", low=1)
    state_dir: str | None = option(None, "sequential state folder (default: OUT.state)", flag="--state",
                                   metavar="DIR")
    resume: bool = option(False, "continue a sequential state")
    edit_weight: int = option(1, "sequential: count each edit token N times when a chunk's statistics are merged "
                                 "(protects earlier edits more; a resumed state keeps its own weight)", low=1,
                              metavar="N")
    edit_statistics: EditStatistics = option(EditStatistics.SEQUENCE, "sequential: where a finished chunk's edit "
                                             "sequences count in the statistics: sequence (every position, the "
                                             "paper) or edit-positions (where the change acted while training); "
                                             "a resumed state keeps its own")
    edit_gamma: float | None = option(None, "sequential: threshold the capability (at γ) and the edits so far (at "
                                            "this γ) each on its own energy, instead of their merged statistics at "
                                            "γ; a resumed state keeps its own", low=0.0, low_open=True, high=1.0,
                                      high_open=True, metavar="G")
    save_model: bool = option(True, "write the edited model (model/) besides the delta",
                              off_help="write only the delta")
    allow_cache_mismatch: bool = option(False, "use a cache computed for other weights anyway")
    source: dict[str, Any] | None = None  # where the requests came from (file, format)


def is_edit_run(folder: str | Path) -> bool:
    """Whether `folder` is the output folder of `run_edit` (it holds run.json and model/)."""
    folder = Path(folder)
    return (folder / RUN_RECORD).is_file() and (folder / MODEL_DIR).is_dir()


def read_run_record(folder: str | Path) -> dict[str, Any]:
    """The run.json of an edit run folder."""
    path = Path(folder) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CrispEditError(f"{path}: invalid JSON ({e})") from None


def _check_context(tokenizer, cfg: EditConfig) -> None:
    if "chat" in cfg.contexts and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("EditConfig.contexts: 'chat' needs a tokenizer with a chat template; this one has none",
                          field="contexts", value=cfg.contexts)


def edit_model(model, tokenizer, requests: Sequence[EditRequest], curvature: "Curvature | None" = None,
               config: EditConfig | None = None, *, targets: Any = None, allow_mismatch: bool = False,
               progress: bool = False) -> "EditResult":
    """Edit `model` in place under the low-curvature constraint and return the result (its `.delta` reverts it).

    Args:
        model, tokenizer: the model to edit and its tokenizer.
        requests: the edit requests (`load_requests(path)`).
        curvature: the capability curvature (`collect_curvature` or `Curvature.load`); the edit targets are its
            targets. Needed by every method but `ft`.
        config: the hyper-parameters (default `EditConfig()`: CrispEdit, γ 0.9, lr 5e-3), or a closed-form
            baseline's config (`crispedit.baselines.config`: `MemitConfig()`, `AlphaEditConfig()`, ...), which runs
            that method through `run_baseline` (the result then has no step losses).
        targets: the layers to edit without a curvature (FT; default: the model type's); with a curvature it
            must select the curvature's targets.
        allow_mismatch: use a curvature computed for other weights.
        progress: show a progress bar (default False).

    Raises:
        CrispEditError: no curvature for a method that needs one, targets other than the curvature's.
        CacheMismatchError: the curvature was computed for other weights (and `allow_mismatch` is False).
        DivergenceError: the loss became NaN/inf (the weights are restored).
    """
    from crispedit.editing.engine import edit
    from crispedit.models.targets import resolve_targets

    if config is not None and not isinstance(config, EditConfig):
        return _edit_with_baseline(model, tokenizer, requests, curvature, config, targets, progress)
    cfg = config if config is not None else EditConfig()
    _check_context(tokenizer, cfg)
    fingerprint = None
    if curvature is None:
        if cfg.projection is not None:
            raise CrispEditError(f"method {cfg.method!r} needs a curvature", hint={"curvature": ...})
        names = resolve_targets(model, targets)
    else:
        names = curvature.targets
        if targets is not None and resolve_targets(model, targets) != names:
            raise CrispEditError(f"{{targets}} selects {resolve_targets(model, targets)}, but the curvature covers "
                                 f"{names}", params={"targets": targets})
        if not allow_mismatch:
            fingerprint = curvature.check_model(model)["weights_sha256"]
    return edit(model, tokenizer, requests, names, cfg, curvature=curvature, progress=progress,
                base_fingerprint=fingerprint)


def _edit_with_baseline(model, tokenizer, requests, curvature, config, targets, progress) -> "EditResult":
    """`edit_model` with a baseline's config: the same in-place edit and delta, as an `EditResult`."""
    from crispedit.baselines.api import run_baseline
    from crispedit.baselines.config import CONFIGS
    from crispedit.editing.engine import EditResult

    name = next((n for n, cls in CONFIGS.items() if type(config) is cls), None)
    if name is None:
        raise CrispEditError(f"edit_model takes an EditConfig or a baseline config ({', '.join(sorted(CONFIGS))}); "
                             f"got {type(config).__name__}")
    t0 = time.perf_counter()
    delta = run_baseline(name, model, tokenizer, requests, curvature, config, targets=targets, progress=progress)
    return EditResult(delta, [], [], [], [], 0, 0, "closed-form", time.perf_counter() - t0,
                      dict(delta.record.get("diagnostics") or {}))


LARGE_BATCH = 200  # requests edited at once from which the measured capability cost calls for a budget


def scale_warning(n_requests: int, cfg: EditConfig, sequential: bool = False) -> str | None:
    """A one-line warning for a large gradient edit without a KL budget, or None.

    The capability cost grows with the number of facts edited at once, much faster than the projection's quadratic
    model predicts: on SmolLM2-135M with the defaults, +4.4 % held-out perplexity at 100 CounterFact edits, +16.5 %
    at 300 and +680 % at 1,000 (README, "1,000 CounterFact edits"; at 1,000, a tenth of the steps still gave +218 %).
    At a fixed number of steps the KL grows about as the square of the number of facts (300, 500, 1,000 edits). The
    measured way to bound it is `--max-kl`: at 500 edits, ε 0.1 kept QA reliability 0.70 of the unscaled 0.78. So a
    user editing that many facts at once should hear of it before the hour of work.

    Most of that growth came from keying the change on the subject: at 1,000 edits (400 steps of 96) CrispEdit
    trained at every token reached +7.3 % (KL 0.071) with QA-context reliability 0.87, against +218 % (KL 1.22) and
    0.36 at the subject's last token (README, "1,000 CounterFact edits"); at 300 (400 steps of 32) +5.8 % against
    +9.6 %, but with the neighbours' QA and chat answers changed. `auto` trains at every token from
    `AUTO_ALL_FROM` requests on; below that a projected method keyed on the subject is told of the trade."""
    if sequential or cfg.max_kl is not None or n_requests < LARGE_BATCH:
        return None
    note = (f"editing {n_requests} requests at once without a KL budget: measured on SmolLM2-135M, held-out "
            "perplexity rose +16.5 % at 300 edits keyed on the subject (+5.8 % at every token in 400 steps, "
            "keeping fewer neighbours' answers) and +7.3 % at 1,000 at every token (+680 % keyed on the subject; "
            "README, Results); --max-kl EPS backs the edit off until KL(base||edited) <= EPS and certifies it")
    if cfg.projection is not None and cfg.positions_for(n_requests) != "all":
        note += ("; --edit-positions all trades the neighbours' answers for capability and reliability (300 edits, "
                 "400 steps: KL 0.051 against 0.114, QA first-token locality 0.03 against 0.33), and `auto` uses it "
                 f"from {AUTO_ALL_FROM} requests on")
    return note


def edited_at_once(job: EditJob) -> int:
    """How many requests one edit trains together: all of them, or a chunk's in a sequential run."""
    return min(len(job.requests), job.chunk_size) if job.sequential else len(job.requests)


def positions_warning(cfg: EditConfig, n_requests: int) -> str | None:
    """A one-line warning for an unconstrained method trained with the change keyed on the subject, or None.

    `--edit-positions subject-last` (what `auto`, the default, gives the projected methods) trains the change at
    the subject's last token only, yet it acts at every position afterwards, and only the projection (whose
    curvature counts every token) keeps it harmless there. Without one the change is unchecked at the other
    positions: LoRA at 100 CounterFact edits reached KL 8-10 nats/token this way against 1.8 with
    `--edit-positions all`, and FT 0.37 against 0.22 (README, "Every method in the wild"). `auto` gives these
    methods `all`, so the warning is for an explicit choice."""
    where = cfg.positions_for(n_requests)
    if cfg.projection is not None or where == "all":
        return None
    return (f"method {cfg.method} with --edit-positions {where}: without a projection the change, trained "
            "at the subject only, acts unchecked at every other token (LoRA, 100 CounterFact edits: KL 8-10 "
            "nats/token against 1.8 at every token; README, Results); pass --edit-positions auto or all")


def check_edit_output(out: str | Path, force: bool, inputs: Sequence[Any] = ()) -> None:
    """The checks `run_edit` makes of its output folder, for callers that want them before loading a model."""
    check_output_folder(out, force, OUTPUT_KIND, protected=inputs)


def job_inputs(model, job: EditJob) -> list[str]:
    """What an edit job reads and its output must never replace, contain or lie inside: the model's folder,
    the curvature cache, the request file and the sequential state."""
    from crispedit.models.loading import source_folders

    src = (job.source or {}).get("path")
    return [str(p) for p in source_folders(model)] + [p for p in (job.curvature_path, src, job.state_dir) if p]


def run_edit(model, tokenizer, job: EditJob, out: str | Path, overwrite: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Run `job` on `model` (edited in place) and write the output folder `out` (see the module docstring).

    Returns:
        The run record (what run.json holds).

    Raises:
        OutputExistsError: `out` exists, is not empty, and `overwrite` is False.
        CrispEditError: no curvature for a method that needs one; targets other than the curvature's.
        CacheMismatchError: the curvature was computed for other weights (`job.allow_cache_mismatch` overrides).
    """
    from crispedit.curvature.api import Curvature
    from crispedit.editing.engine import diagnostics as edit_diagnostics
    from crispedit.editing.engine import edit
    from crispedit.models.targets import resolve_targets

    out = Path(out)
    check_output_folder(out, overwrite, OUTPUT_KIND, protected=job_inputs(model, job))
    _check_context(tokenizer, job.cfg)
    check_requests_fit(tokenizer, job.requests, max_positions(model), job.cfg.contexts)
    for note in (scale_warning(len(job.requests), job.cfg, job.sequential),
                 positions_warning(job.cfg, edited_at_once(job))):
        if note:
            logger.warning(note)
    t0 = time.perf_counter()
    curvature, fingerprint = None, None
    if job.curvature_path:
        # The model is checked once here and its fingerprint carried into the edit (not computed again).
        curvature = Curvature.load(job.curvature_path, device="cpu")
        if not job.allow_cache_mismatch:
            fingerprint = curvature.check_model(model, where=str(job.curvature_path))["weights_sha256"]
        targets = curvature.targets
        if job.targets is not None:
            asked = resolve_targets(model, job.targets)
            if asked != targets:
                raise CrispEditError(f"{{targets}} selects {asked}, but the curvature cache covers {targets}",
                                     params={"targets": job.targets})
    else:
        if job.cfg.projection is not None:
            raise CrispEditError(f"method {job.cfg.method!r} needs a curvature cache", hint={"curvature_path": ...})
        targets = resolve_targets(model, job.targets)

    chunks_log = None
    if job.sequential:
        from crispedit.editing.sequential import SequentialEditor

        if curvature is None:
            raise CrispEditError("sequential editing needs a curvature cache", hint={"curvature_path": ...})
        state = Path(job.state_dir or f"{out}.state")
        from crispedit.models.loading import source_folders

        check_apart_from_inputs(state, source_folders(model), "sequential state")
        if job.resume:
            ed = SequentialEditor.open(state, model)
        else:
            ed = SequentialEditor.create(state, model, curvature, job.cfg, edit_weight=job.edit_weight,
                                         base_fingerprint=fingerprint, chunk_size=job.chunk_size,
                                         edit_statistics=job.edit_statistics, edit_gamma=job.edit_gamma)
        start = ed.remaining(job.requests, job.chunk_size)  # a resumed state continues after its last chunk
        results = []
        t_seq = time.perf_counter()
        for i in range(start, len(job.requests), job.chunk_size):
            results.append(ed.edit_chunk(model, tokenizer, job.requests[i : i + job.chunk_size], progress=progress))
        delta = ed.cumulative_delta(model)
        chunks_log = ed.state["chunks"]
        step_losses = [v for r in results for v in r.step_losses]
        request_losses = [r.request_losses for r in results]
        # The whole edit (all chunks so far) against the capability curvature it started from.
        diagnostics = edit_diagnostics(delta.deltas, curvature, job.cfg)
        delta.record.update(steps=sum(c["steps"] for c in chunks_log), diagnostics=diagnostics,
                            seconds=time.perf_counter() - t_seq,
                            final_loss=chunks_log[-1]["final_loss"] if chunks_log else None)
    else:
        res = edit(model, tokenizer, job.requests, targets, job.cfg, curvature=curvature, progress=progress,
                   base_fingerprint=fingerprint)
        delta = res.delta
        step_losses, request_losses, diagnostics = res.step_losses, res.request_losses, res.diagnostics
    budget = None
    if job.cfg.max_kl is not None:
        budget = apply_kl_budget(model, tokenizer, delta, job.cfg, curvature)

    record = {
        "model": getattr(model, "crispedit_display_name", None) or getattr(model.config, "_name_or_path", None),
        "targets": targets,
        "config": job.cfg.to_json(),
        "edit_positions": job.cfg.positions_for(edited_at_once(job)),  # `auto` resolved for this method and size
        "sequential": job.sequential,
        "chunk_size": job.chunk_size if job.sequential else None,
        "chunks": chunks_log,
        "requests": dict(job.source or {}, n=len(job.requests), sha256=delta.record.get("requests_sha256")),
        "curvature": None if curvature is None else {
            "path": str(job.curvature_path), "n_tokens": curvature.record.get("n_tokens"),
            "collection": curvature.record.get("collection"), "summary": curvature.record.get("summary"),
            "kept_fraction": {n: float(m.double().mean()) for n, m in
                              curvature.masks(job.cfg.gamma, job.cfg.scope).items()}},
        "step_losses": step_losses,
        "request_losses": request_losses,
        "diagnostics": diagnostics,
        "kl_budget": budget,
        "seconds_edit": time.perf_counter() - t0,
    }
    write_run_folder(out, delta, record, model, tokenizer, job.save_model, overwrite, t0)
    logger.info("edit run written to %s in %.1f s", out, record["seconds_total"])
    return record


def apply_kl_budget(model, tokenizer, delta, cfg: EditConfig, curvature=None) -> dict[str, Any]:
    """Back the applied edit off until KL(base ‖ edited) ≤ cfg.max_kl on held-out text: the held-out split of the
    corpus the curvature was collected on (the embedded Wikipedia excerpt by default), which the curvature never
    saw. Returns the certificate (also written into the delta's record)."""
    from crispedit.data.corpus import corpus_of_curvature
    from crispedit.editing.budget import enforce_kl_budget
    from crispedit.evaluation.generation import pad_id_of

    heldout = corpus_of_curvature(tokenizer, curvature, "heldout", cfg.budget_samples)
    cert = enforce_kl_budget(model, delta, heldout.sequences, cfg.max_kl, pad_id=pad_id_of(tokenizer))
    cert["corpus"] = heldout.describe()
    delta.record["kl_budget"] = cert
    return cert


def write_run_folder(out: str | Path, delta, record: dict[str, Any], model, tokenizer, with_model: bool,
                     overwrite: bool, t0: float) -> None:
    """The output folder of one edit run, written in one crash-safe step whatever the method: OUT/delta/,
    OUT/model/ (when `with_model`) and OUT/run.json (`record` plus the total seconds since `t0`)."""
    from crispedit.models.loading import save_model

    with atomic_dir(out, overwrite=overwrite, kind=OUTPUT_KIND) as tmp:
        delta.save(tmp / DELTA_DIR)
        if with_model:
            save_model(model, tokenizer, tmp / MODEL_DIR)
        record["seconds_total"] = time.perf_counter() - t0
        (tmp / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
