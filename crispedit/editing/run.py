"""One edit job end to end (the library call behind `crispedit edit` and the demo): read requests, load the
curvature, edit (batch or sequential), and write the output folder atomically:

    OUT/delta/      ΔW per target (safetensors) + record (applies to / reverts from the base bit-exactly)
    OUT/model/      the edited model (save_pretrained; the input model is never written)
    OUT/run.json    configuration, curvature facts, losses, timings, diagnostics
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from crispedit.data.records import EditRequest
from crispedit.editing.config import EditConfig
from crispedit.errors import CrispEditError
from crispedit.io import atomic_dir


@dataclass
class EditJob:
    requests: Sequence[EditRequest]
    cfg: EditConfig
    curvature_path: str | None = None
    targets: Any = None  # layer spec when there is no curvature (FT)
    sequential: bool = False
    chunk_size: int = 100
    state_dir: str | None = None
    resume: bool = False
    edit_weight: int = 1  # sequential: each edit token counts this many times in the merged statistics
    save_model: bool = True
    allow_cache_mismatch: bool = False
    source: dict[str, Any] | None = None  # where the requests came from (file, format)


def run_edit(model, tokenizer, job: EditJob, out: str | Path, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    from crispedit.curvature.api import Curvature
    from crispedit.editing.engine import diagnostics as edit_diagnostics
    from crispedit.editing.engine import edit
    from crispedit.models.loading import save_model
    from crispedit.models.targets import resolve_targets

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CrispEditError(f"output folder {out} exists and is not empty (choose another, or --force)")
    t0 = time.perf_counter()
    curvature = None
    if job.curvature_path:
        curvature = Curvature.load(job.curvature_path, model=model, allow_mismatch=job.allow_cache_mismatch,
                                   device="cpu")
        targets = curvature.targets
        if job.targets is not None:
            asked = resolve_targets(model, job.targets)
            if asked != targets:
                raise CrispEditError(f"--layers selects {asked}, but the curvature cache covers {targets}")
    else:
        if job.cfg.method != "ft":
            raise CrispEditError(f"method {job.cfg.method!r} needs a curvature cache (--curvature)")
        targets = resolve_targets(model, job.targets)

    chunks_log = None
    if job.sequential:
        from crispedit.editing.sequential import SequentialEditor

        if curvature is None:
            raise CrispEditError("sequential editing needs a curvature cache (--curvature)")
        state = Path(job.state_dir or f"{out}.state")
        if job.resume:
            ed = SequentialEditor.open(state, model)
        else:
            ed = SequentialEditor.create(state, model, curvature, job.cfg, edit_weight=job.edit_weight)
        results = []
        t_seq = time.perf_counter()
        for i in range(0, len(job.requests), job.chunk_size):
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
        res = edit(model, tokenizer, job.requests, targets, job.cfg, curvature=curvature, progress=progress)
        delta = res.delta
        step_losses, request_losses, diagnostics = res.step_losses, res.request_losses, res.diagnostics
    budget = None
    if job.cfg.max_kl is not None:
        budget = apply_kl_budget(model, tokenizer, delta, job.cfg, curvature)

    record = {
        "model": getattr(model, "crispedit_display_name", None) or getattr(model.config, "_name_or_path", None),
        "targets": targets,
        "config": job.cfg.to_json(),
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
    with atomic_dir(out, overwrite=overwrite) as tmp:
        delta.save(tmp / "delta")
        if job.save_model:
            save_model(model, tokenizer, tmp / "model")
        record["seconds_total"] = time.perf_counter() - t0
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def apply_kl_budget(model, tokenizer, delta, cfg: EditConfig, curvature=None) -> dict[str, Any]:
    """Back the applied edit off until KL(base ‖ edited) ≤ cfg.max_kl on held-out text: the held-out split of the
    corpus the curvature was collected on (the embedded Wikipedia excerpt by default), which the curvature never
    saw. Returns the certificate (also written into the delta's record)."""
    from crispedit.data.corpus import build_corpus
    from crispedit.editing.budget import enforce_kl_budget
    from crispedit.evaluation.generation import pad_id_of

    first = ((curvature.record.get("corpora") or [{}])[0] if curvature is not None else {}) or {}
    source = None if first.get("source") in (None, "wikipedia") else first["source"]
    heldout = build_corpus(tokenizer, source, n_samples=cfg.budget_samples, max_length=256, split="heldout",
                           heldout_fraction=first.get("heldout_fraction", 0.1),
                           split_seed=first.get("split_seed", 0), text_field=first.get("text_field", "text"))
    cert = enforce_kl_budget(model, delta, heldout.sequences, cfg.max_kl, pad_id=pad_id_of(tokenizer))
    cert["corpus"] = heldout.describe()
    delta.record["kl_budget"] = cert
    return cert
