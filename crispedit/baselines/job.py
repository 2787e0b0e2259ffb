"""One baseline edit job written as `crispedit edit` writes every run (the library call behind `crispedit edit
--method memit|alphaedit|ultraedit|mend`):

    OUT/delta/      ΔW per target (safetensors) + record (applies to / reverts from the base bit-exactly)
    OUT/model/      the edited model (unless `job.save_model` is False)
    OUT/run.json    method, its config, targets, curvature facts, timings, diagnostics

so `crispedit eval` reads a baseline's folder or delta exactly as a CrispEdit one. The job is `EditJob` (the run
options: cache, layers, sequential/chunk size, save_model, allow_cache_mismatch) plus the method's own config; the
sequential variant is the config's `chunk_size`, which the caller sets from the job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from crispedit.editing.run import OUTPUT_KIND, EditJob, job_inputs, write_run_folder

logger = logging.getLogger(__name__)


def run_baseline_edit(model, tokenizer, method: str, config: Any, job: EditJob, out: str | Path,
                      overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run baseline `method` with `config` on `model` (edited in place) for `job`, and write the output folder.

    Returns:
        The run record (what run.json holds).

    Raises:
        OutputExistsError: `out` exists, is not empty, and `overwrite` is False.
        CrispEditError: bad input (see `crispedit.baselines.validate`).
        CacheMismatchError: the curvature was computed for other weights (`job.allow_cache_mismatch` overrides).
    """
    from crispedit.baselines.api import run_baseline, validate
    from crispedit.baselines.common import config_json
    from crispedit.curvature.api import Curvature
    from crispedit.data.readers import check_requests_fit, max_positions
    from crispedit.io import check_output_folder

    out = Path(out)
    check_output_folder(out, overwrite, OUTPUT_KIND, protected=job_inputs(model, job))
    source = (job.source or {}).get("path")
    validate(method, job.requests, config, curvature=job.curvature_path, targets=job.targets, source=source)
    check_requests_fit(tokenizer, job.requests, max_positions(model))
    t0 = time.perf_counter()
    curvature = None
    if job.curvature_path:
        curvature = Curvature.load(job.curvature_path, device="cpu")
        if not job.allow_cache_mismatch:
            curvature.check_model(model, where=str(job.curvature_path))
    delta = run_baseline(method, model, tokenizer, job.requests, curvature, config, targets=job.targets,
                         progress=progress)
    rec = delta.record
    record = {
        "model": getattr(model, "crispedit_display_name", None) or getattr(model.config, "_name_or_path", None),
        "method": method,
        "targets": list(delta.targets),
        "config": config_json(method, config),
        "sequential": config.chunk_size is not None and config.chunk_size < len(job.requests),
        "chunk_size": config.chunk_size,
        "chunks": rec.get("chunks"),
        "requests": dict(job.source or {}, n=len(job.requests), sha256=rec.get("requests_sha256")),
        "curvature": None if curvature is None else {
            "path": str(job.curvature_path), "n_tokens": curvature.record.get("n_tokens"),
            "collection": curvature.record.get("collection"), "summary": curvature.record.get("summary")},
        "step_losses": [],
        "request_losses": [],
        "diagnostics": rec.get("diagnostics"),
        "timings": rec.get("timings"),
        "kl_budget": None,
        "seconds_edit": time.perf_counter() - t0,
    }
    write_run_folder(out, delta, record, model, tokenizer, job.save_model, overwrite, t0)
    logger.info("%s edit run written to %s in %.1f s", method, out, record["seconds_total"])
    return record
