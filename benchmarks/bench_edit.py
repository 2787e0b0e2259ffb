"""Editing speed on the embedded SmolLM2-135M with the default targets.

Prints, measured in one run:
  - the median time of a projected CrispEdit step (Adam in the masked eigenbasis, and the project-the-update
    variant) over a plain FT step, same batches, interleaved (target ≤ 1.05);
  - the time of the projection alone per step (grouped masked rotations against full ones, a few γ);
  - the wall time of editing N CounterFact facts with the default settings.

    python benchmarks/bench_edit.py --curvature CACHE [--n 100] [--out benchmarks/results/bench_edit.json]

Without --curvature a small cache (32 Wikipedia chunks of 128 tokens) is built first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curvature")
    ap.add_argument("--edits", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per method and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/bench_edit.json")
    a = ap.parse_args()

    from crispedit.curvature.api import Curvature, CurvatureConfig
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets

    model, tok = load_model("smollm2-135m-instruct")
    targets = resolve_targets(model, None)
    if a.curvature:
        cur = Curvature.load(a.curvature, model=model)
    else:
        corpus = build_corpus(tok, None, n_samples=32, max_length=128)
        cur = Curvature.compute(model, targets, corpus.sequences, corpus.describe(), CurvatureConfig(),
                                pad_id=tok.pad_token_id)
    requests = load_requests(a.edits, limit=a.n)
    batch = requests[: a.batch_size]
    # Fixed work per step: one epoch of `batch_size` requests per step, no early stop.
    variants = {
        "ft": EditConfig(method="ft", epochs=a.steps, batch_size=a.batch_size, early_stop_loss=1e-9),
        "crispedit-eigen": EditConfig(method="crispedit", epochs=a.steps, batch_size=a.batch_size,
                                      early_stop_loss=1e-9, projection_mode="eigen"),
        "crispedit-update": EditConfig(method="crispedit", epochs=a.steps, batch_size=a.batch_size,
                                       early_stop_loss=1e-9, projection_mode="update"),
    }
    gamma = EditConfig().gamma
    projs = cur.projectors(gamma, kind="kfac")
    # The same eigen-mode step with the plain full rotations, to show what the grouped masked rotations save.
    variants["crispedit-eigen-full-rotations"] = variants["crispedit-eigen"]
    full = cur.projectors(gamma, kind="kfac")
    for P in full.values():
        P.grouped = False
    projectors_for = {"ft": None, "crispedit-eigen-full-rotations": full}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, cfg in variants.items():
            res = edit(model, tok, batch, targets, cfg, projectors=projectors_for.get(name, projs), progress=False)
            times[name] += res.step_seconds[1:]  # the first step warms up
            res.delta.revert(model)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Projection alone per step (rotation + mask + back-rotation, all targets): the grouped masked rotations
    # the optimiser uses against full rotations, at a few γ.
    g = {n: torch.randn(projs[n].shape) for n in targets}

    def per_step(fn) -> float:
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(5):
            fn()
        return (time.perf_counter() - t) / 5

    proj_s = {}
    for gm in sorted({0.5, gamma, 0.99}):
        ps = cur.projectors(gm, kind="kfac")
        proj_s[str(gm)] = {
            "masked": per_step(lambda: [P.unrotate_masked(P.rotate_masked(g[n])) for n, P in ps.items()]),
            "full": per_step(lambda: [P.unrotate(P.rotate(g[n]) * P.M) for n, P in ps.items()]),
        }

    t = time.perf_counter()
    res = edit(model, tok, requests, targets, EditConfig(), curvature=cur, progress=True)
    wall = time.perf_counter() - t
    out = {
        "gamma": gamma,
        "batch_size": a.batch_size,
        "step_seconds_median": med,
        "ratio_crispedit_eigen_over_ft": med["crispedit-eigen"] / med["ft"],
        "ratio_crispedit_update_over_ft": med["crispedit-update"] / med["ft"],
        "ratio_crispedit_eigen_full_rotations_over_ft": med["crispedit-eigen-full-rotations"] / med["ft"],
        "projection_seconds_per_step": proj_s,
        "edit_n": len(requests),
        "edit_wall_seconds": wall,
        "edit_steps": res.steps,
        "edit_final_loss": res.epoch_losses[-1],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
