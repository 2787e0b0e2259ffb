"""Editing speed on SmolLM2-135M-Instruct: step times of three variants measured in one run, and the wall time and
peak memory of whole edits.

Step times (same requests, the variants interleaved round by round, the first step of every run excluded as
warm-up, ≥ 10 timed steps per variant; median, quartiles, min and max):
  (a) `ft-plain`   plain FT with the full forward (every layer, the LM head at every position),
  (b) `ft`         FT with the frozen prefix cached and logits only at the target positions,
  (c) `crispedit`  CrispEdit (defaults) with both, and with the edit positions' frozen positions cached,
  (d) `crispedit-every-position`  (c) without the frozen positions' cache (the kept layers run over every position);
ratios (c)/(a), (c)/(b) and (c)/(d). (b) has the frozen positions' cache too: every variant trains at CrispEdit's edit positions
(subject-last by default; `auto` alone would give FT every token). Whole edits: wall time and peak memory of editing N CounterFact facts with the
defaults, each N in a fresh process (peak RSS on CPU, peak allocated memory on CUDA).

With `--batch-sizes 16,32,96` it measures instead how CrispEdit's step time grows with the batch (the same requests,
the sizes interleaved round by round, warm-up excluded): the median step, the median per sequence, and the padded
share of the positions the kept layers run (batches are cut from length-sorted windows, so padding depends on the
batch size).

    python benchmarks/bench_edit.py --curvature CACHE [--sizes 100,1000] [--device cuda --dtype bfloat16]
        [--out benchmarks/results/bench_edit.json]
    python benchmarks/bench_edit.py --curvature CACHE --batch-sizes 16,32,96 --batch-requests 300 --sizes ''
        --out benchmarks/results/bench_batch_size.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _spread(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def _setup(a):
    from crispedit.curvature.api import Curvature
    from crispedit.data.readers import load_requests
    from crispedit.models.loading import load_model

    from crispedit.models.targets import resolve_targets

    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    cur = Curvature.load(a.curvature, device="cpu")
    targets = resolve_targets(model, a.layers)
    if cur.targets != targets:  # a cache over more layers serves the chosen ones
        cur = cur.select(targets)
    return model, tok, cur, load_requests


def steps(a) -> dict:
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit

    model, tok, cur, load_requests = _setup(a)
    requests = load_requests(a.edits, limit=a.batch_requests)
    targets = cur.targets
    base = EditConfig(**a.overrides)
    common = dict(a.overrides, epochs=a.steps, early_stop_loss=1e-9, max_steps=a.steps)
    # Every variant trains at CrispEdit's positions (`auto` would give FT every token), so that the ratios compare
    # the forward and the projection, not two amounts of work.
    common.setdefault("edit_positions", EditConfig(**dict(common, method="crispedit")).positions_for(len(requests)))
    variants = {
        "ft-plain": EditConfig(method="ft", cache_prefix=False, target_logits=False, **common),
        "ft": EditConfig(method="ft", **common),
        "crispedit": EditConfig(method="crispedit", **common),
        "crispedit-every-position": EditConfig(method="crispedit", cache_positions=False, **common),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    setup_s: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, cfg in variants.items():
            t = time.perf_counter()
            res = edit(model, tok, requests, targets, cfg, curvature=cur if cfg.method != "ft" else None,
                       progress=False)
            total = time.perf_counter() - t
            times[name] += res.step_seconds[1:]
            setup_s[name].append(total - sum(res.step_seconds))
            res.delta.revert(model)
    st = {k: _spread(v) for k, v in times.items()}
    med = {k: v["median"] for k, v in st.items()}
    return {"step_seconds": st, "setup_seconds_per_run": setup_s,
            "ratio_crispedit_over_ft_plain": med["crispedit"] / med["ft-plain"],
            "ratio_crispedit_over_ft": med["crispedit"] / med["ft"],
            "ratio_ft_over_ft_plain": med["ft"] / med["ft-plain"],
            "ratio_crispedit_over_every_position": med["crispedit"] / med["crispedit-every-position"],
            "sequences_per_step": min(base.batch_size, res.delta.record.get("training_sequences", 0)),
            "requests": len(requests), "training_sequences": res.delta.record.get("training_sequences"),
            "edit_positions": common["edit_positions"], "config": base.to_json()}


def batch_sweep(a, sizes: list[int]) -> dict:
    """CrispEdit's step time against the batch size, the sizes interleaved round by round."""
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit

    model, tok, cur, load_requests = _setup(a)
    requests = load_requests(a.edits, limit=a.batch_requests)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    padding: dict[int, float] = {}
    for _ in range(a.rounds):
        for b in sizes:
            cfg = EditConfig(**dict(a.overrides, batch_size=b, epochs=a.steps, early_stop_loss=1e-9,
                                    max_steps=a.steps))
            res = edit(model, tok, requests, cur.targets, cfg, curvature=cur, progress=False)
            times[b] += res.step_seconds[1:]
            res.delta.revert(model)
            padding.setdefault(b, res.delta.record["forward"].get("padded_share"))
    rows = []
    for b in sizes:
        st = _spread(times[b])
        rows.append({"batch_size": b, "step_seconds": st, "ms_per_sequence": 1000 * st["median"] / b,
                     "padded_share": padding.get(b)})
    return {"batch_sweep": rows, "requests": len(requests), "config": EditConfig(**a.overrides).to_json()}


def wall(a) -> dict:
    """One whole edit with the defaults (run in a fresh process so that the peak memory is this edit's)."""
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit

    model, tok, cur, load_requests = _setup(a)
    requests = load_requests(a.edits, limit=a.wall)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = edit(model, tok, requests, cur.targets, EditConfig(**a.overrides), curvature=cur, progress=False)
    seconds = time.perf_counter() - t
    out = {"n": len(requests), "seconds": seconds, "steps": res.steps, "epochs": res.epochs, "stopped": res.stopped,
           "final_loss": res.epoch_losses[-1], "training_sequences": res.delta.record.get("training_sequences"),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if a.device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curvature", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--edits", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--layers", default=None, help="target layers (default: the model type's defaults)")
    ap.add_argument("--recipe", default=None, help="a run JSON (EditConfig fields + layers) instead of the defaults")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-requests", type=int, default=64, help="requests the timed steps draw from")
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-sizes", default="", help="comma list: measure the step time against the batch size")
    ap.add_argument("--sizes", default="100", help="whole-edit sizes, comma list ('' for none)")
    ap.add_argument("--wall", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--out", default="benchmarks/results/bench_edit.json")
    a = ap.parse_args()
    a.overrides = {}
    if a.recipe:
        run = json.loads(Path(a.recipe).read_text())
        a.layers = a.layers or run.get("layers")
        a.overrides = {k: v for k, v in run.items() if k not in ("name", "layers", "method", "note", "max_kl")}
    if a.wall is not None:
        print(json.dumps(wall(a)))
        return
    if a.batch_sizes:
        out = {"device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(),
               **batch_sweep(a, [int(x) for x in a.batch_sizes.split(",")])}
        for row in out["batch_sweep"]:
            print(f"batch {row['batch_size']:4d}: step {row['step_seconds']['median']:.2f} s "
                  f"(q1 {row['step_seconds']['q1']:.2f}, q3 {row['step_seconds']['q3']:.2f}), "
                  f"{row['ms_per_sequence']:.1f} ms per sequence, padded share {row['padded_share']}", flush=True)
        _write(a.out, out)
        return
    out = {"device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(), **steps(a), "whole_edits": []}
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1), flush=True)
    for n in [int(x) for x in a.sizes.split(",") if x.strip()]:
        cmd = [sys.executable, __file__, "--curvature", a.curvature, "--model", a.model, "--edits", a.edits,
               "--device", a.device, "--dtype", a.dtype, "--wall", str(n)] + (["--layers", a.layers] if a.layers else []) \
            + (["--recipe", a.recipe] if a.recipe else [])
        _write(a.out, out)  # what is measured so far survives an interrupted run
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        out["whole_edits"].append(row)
        print(json.dumps(row), flush=True)
    _write(a.out, out)


def _write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
