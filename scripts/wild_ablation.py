"""Edit runs judged in the wild: the ablations behind the defaults and the results tables.

Each run edits the first N requests of each data set with one configuration, evaluates the generated answers (the
WILD QA context, the chat template, the raw prompt; reliability on the edit prompt, generalisation on the rephrase,
locality on the neighbourhood/NQ prompt against the base model), held-out perplexity and KL (and, if asked, MMLU/ARC
samples), and reverts the edit bit-exactly before the next run. One model load, one curvature cache for all layers
(any subset is selected from it), the base model's generations memoised across runs. Results go to OUT, one JSON per
(run, data set), or with --jsonl one line each in one file; finished runs are skipped, so the script can be stopped
and restarted.

    python scripts/wild_ablation.py --cache runs/cache-all --runs scripts/runs/ablation.json --out runs/ablate \\
        --data cf=../shared/data/counterfact/counterfact-edit.json:100 --data zsre=../shared/data/zsre/zsre_mend_800.json:100

A run is a JSON object: {"name": ..., "layers": "model.layers.{10-12}.mlp.down_proj" (default: the model type's
defaults), "method": ..., any other EditConfig field (gamma, lr, epochs, contexts, prefixes, max_kl, ...)}; method
"none" evaluates the base model itself. A run with "sequential": true edits in chunks of "chunk_size" (default 100)
with CrispEdit-Seq ("edit_weight", "edit_statistics", "edit_gamma" as `crispedit edit --sequential`); its record adds the reliability of each chunk,
measured after the last one (under --eval-sample, over each chunk's judged requests). With "state": DIR its state
folder is DIR/<data set> and persists: a stopped run resumes there after its last finished chunk. A run with "single": true edits each request alone, from the base model each time
(the one-fact-at-a-time protocol), and pools the per-request results; its perplexity and KL are the means over the
single edits. Methods memit, alphaedit, ultraedit and mend run through `crispedit.baselines.run_baseline`
(other keys: fields of the method's config, e.g. "mom2_weight", "hypernet"); "sequential" sets their chunk size;
without "layers" memit/alphaedit edit the model type's default down-projections (the layers a default curvature
cache covers) with the key covariance selected from --cache, and ultraedit its own gate/up layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

NOT_CONFIG = ("name", "layers", "note", "sequential", "chunk_size", "edit_weight", "single", "state",
              "edit_statistics", "edit_gamma")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache", required=True, help="curvature cache covering every layer a run may use")
    p.add_argument("--runs", required=True, help="JSON file: a list of runs")
    p.add_argument("--only", default=None, help="comma list of run names to do (default: all)")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH:N")
    p.add_argument("--out", required=True, help="a folder (one JSON per run) or, with --jsonl, a .jsonl file")
    p.add_argument("--jsonl", action="store_true", help="append one line per run to OUT instead")
    p.add_argument("--save-deltas", default=None,
                   help="a folder: save each run's delta there (NAME-DATA/, a delta folder) for later analysis")
    p.add_argument("--slim", action="store_true", help="leave the per-request generations out of the results")
    p.add_argument("--heldout", type=int, default=32, help="held-out Wikipedia chunks for perplexity/KL")
    p.add_argument("--contexts", default="qa,chat,raw")
    p.add_argument("--benchmarks", default="", help="e.g. mmlu,arc (200-question samples)")
    p.add_argument("--benchmark-limit", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--eval-sample", type=int, default=None, metavar="K",
                   help="judge the generated answers of K evenly spaced edited requests instead of all of them "
                        "(every request is still edited; perplexity and KL are unaffected). For scale runs where "
                        "evaluating every request would cost more than the edit; the record says how many were judged")
    return p.parse_args()


class Results:
    """Where finished runs are kept: a folder of JSON files or one JSONL file."""

    def __init__(self, out: str, jsonl: bool):
        self.path, self.jsonl = Path(out), jsonl
        if jsonl:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.done = set()
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        d = json.loads(line)
                        self.done.add((d["run"]["name"], d["data"]))
                    except (json.JSONDecodeError, KeyError):
                        continue
        else:
            self.path.mkdir(parents=True, exist_ok=True)

    def has(self, name: str, data: str) -> bool:
        if self.jsonl:
            return (name, data) in self.done
        return (self.path / f"{name}__{data}.json").exists()

    def add(self, record: dict) -> None:
        if self.jsonl:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            (self.path / f"{record['run']['name']}__{record['data']}.json").write_text(
                json.dumps(record, indent=1) + "\n")


def edit_sequentially(model, tok, requests, targets, cfg, curvature, chunk_size: int, edit_weight: int,
                      edit_statistics: str = "sequence", edit_gamma: float | None = None, state: Path | None = None):
    """CrispEdit-Seq over `requests` in chunks, in `state` (resumed after its last finished chunk if it exists) or
    a temporary state folder; returns (a result-like summary, the cumulative delta, the per-chunk log)."""
    import tempfile
    from types import SimpleNamespace

    from crispedit.editing.sequential import SequentialEditor

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "state" if state is None else state
        if (folder / "state.json").is_file():
            ed = SequentialEditor.open(folder, model)
            check_resumed_settings(folder, ed.state, cfg, edit_weight, edit_statistics, edit_gamma)
            print(f"resuming {folder} after {len(ed.state['chunks'])} chunk(s)", flush=True)
        else:
            ed = SequentialEditor.create(folder, model, curvature, cfg, edit_weight=edit_weight,
                                         chunk_size=chunk_size, edit_statistics=edit_statistics,
                                         edit_gamma=edit_gamma)
        for i in range(ed.remaining(requests, chunk_size), len(requests), chunk_size):
            r = ed.edit_chunk(model, tok, requests[i:i + chunk_size])
            print(f"chunk {len(ed.state['chunks'])}: {r.steps} steps, loss "
                  f"{r.epoch_losses[-1] if r.epoch_losses else float('nan'):.4f}, {r.seconds:.0f} s", flush=True)
        delta = ed.cumulative_delta(model)
        log = ed.state["chunks"]
    last = log[-1]["final_loss"] if log else None
    res = SimpleNamespace(steps=sum(c["steps"] for c in log), stopped=[c["stopped"] for c in log],
                          epoch_losses=[] if last is None else [last])
    return res, delta, log


def check_resumed_settings(folder: Path, state: dict, cfg, edit_weight: int, edit_statistics: str,
                           edit_gamma: float | None) -> None:
    """Refuse to resume a state whose edit settings differ from the run's: the state would go on editing with its
    own settings while the record said the run's (the requests and chunk size are checked by the editor)."""
    want = {"config": cfg.to_json(), "edit_weight": int(edit_weight), "edit_statistics": str(edit_statistics),
            "edit_gamma": None if edit_gamma is None else float(edit_gamma)}
    for key, value in want.items():
        have = state.get(key)
        if key == "config":
            diff = sorted(k for k in set(value) | set(have or {}) if (have or {}).get(k) != value.get(k))
            if diff:
                raise SystemExit(f"{folder}: this state was started with other edit settings ({', '.join(diff)}: "
                                 f"{', '.join(repr((have or {}).get(k)) for k in diff)}, the run says "
                                 f"{', '.join(repr(value.get(k)) for k in diff)}); use the state's settings or "
                                 "start a new state")
        elif have != value:
            raise SystemExit(f"{folder}: this state was started with {key} {have!r}, the run says {value!r}; use "
                             "the state's settings or start a new state")


def chunk_reliability(per_request: list, chunk_log: list, judged_index: list[int]) -> list:
    """Generated reliability (each context's scorer as in the summary: exact for qa/raw, contains for chat) of
    each chunk's judged requests (`judged_index`: each judged row's index among the edited requests), after the
    last chunk."""
    out, start = [], 0
    for c in chunk_log:
        stop = start + c["n_edits"]
        rows = [r for r, j in zip(per_request, judged_index) if start <= j < stop]
        start = stop
        entry = dict(c, n_judged=len(rows))
        for ctx, key, name in (("qa", "exact_match", "qa"), ("chat", "contains_match", "chat_contains"),
                               ("raw", "exact_match", "raw")):
            vals = [r["reliability"]["generated"][ctx][key] for r in rows if ctx in r["reliability"]["generated"]]
            if vals:
                entry[f"reliability_gen_{name}"] = sum(vals) / len(vals)
        out.append(entry)
    return out


def main() -> None:
    args = parse_args()
    if args.eval_sample is not None and args.eval_sample < 1:
        raise SystemExit(f"--eval-sample: must be at least 1, got {args.eval_sample}")
    torch.set_num_threads(args.threads)
    from crispedit.curvature.api import Curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import evenly_spaced, load_requests
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from crispedit.editing.run import apply_kl_budget
    from crispedit.evaluation.benchmarks import run_mc_benchmark
    from crispedit.evaluation.capability import capability_metrics
    from crispedit.evaluation.edit_metrics import evaluate_edits
    from crispedit.evaluation.generation import pad_id_of
    from crispedit.evaluation.report import build_report
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets

    results = Results(args.out, args.jsonl)
    runs = json.loads(Path(args.runs).read_text())
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["name"] in keep]
    data = {}
    for spec in args.data:
        name, rest = spec.split("=", 1)
        path, n = rest.rsplit(":", 1)
        data[name] = load_requests(path, limit=int(n), skip_invalid=True)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    base, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    full = Curvature.load(args.cache, device="cpu")
    heldout = build_corpus(tok, None, n_samples=args.heldout, max_length=256, split="heldout")
    memo: dict = {}
    contexts = tuple(args.contexts.split(","))
    benches = [b for b in args.benchmarks.split(",") if b]
    for run in runs:
        for dname, requests in data.items():
            if results.has(run["name"], dname):
                continue
            method = run.get("method", "crispedit")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res, budget, delta, targets, chunk_log = None, None, None, None, None
            fields = {k: v for k, v in run.items() if k not in NOT_CONFIG}
            if method in ("memit", "alphaedit", "ultraedit", "mend"):
                from crispedit.baselines import NEEDS_CACHE, config_class, run_baseline

                targets = resolve_targets(model, run.get("layers")) if run.get("layers") else None
                if targets is None and method in NEEDS_CACHE:  # the layers a default `crispedit curvature` covers
                    targets = resolve_targets(model, None)
                covered = targets is not None and all(t in full.targets for t in targets)
                cur = full.select(targets) if method in NEEDS_CACHE or covered else None
                bfields = {k: v for k, v in fields.items() if k != "method"}
                if run.get("sequential"):
                    bfields["chunk_size"] = int(run.get("chunk_size", 100))
                bcfg = config_class(method)(**bfields)
                delta = run_baseline(method, model, tok, requests, cur, bcfg, targets=targets)
                targets = delta.targets
                if run.get("sequential"):
                    chunk_log = [{"n_edits": len(requests[i:i + bcfg.chunk_size])}
                                 for i in range(0, len(requests), bcfg.chunk_size)]
            elif run.get("single"):
                record = edit_one_at_a_time(run, dname, requests, model, base, tok, full, heldout, fields, contexts,
                                            args, memo)
                results.add(record)
                print_row(run, dname, record["summary"], record["steps"], record["edit_seconds"],
                          record["eval_seconds"])
                continue
            elif run.get("sequential"):
                cfg = EditConfig(**fields)
                targets = resolve_targets(model, run.get("layers"))
                res, delta, chunk_log = edit_sequentially(
                    model, tok, requests, targets, cfg, full.select(targets, model),  # fingerprint of the subset
                    int(run.get("chunk_size", 100)), int(run.get("edit_weight", 1)),
                    run.get("edit_statistics", "sequence"), run.get("edit_gamma"),
                    Path(run["state"]) / dname if run.get("state") else None)
            elif method != "none":
                cfg = EditConfig(**fields)
                targets = resolve_targets(model, run.get("layers"))
                cur = full.select(targets) if cfg.method in ("crispedit", "adam-nscl") else None
                res = edit(model, tok, requests, targets, cfg, curvature=cur, progress=False)
                delta = res.delta
                if cfg.max_kl is not None:
                    budget = apply_kl_budget(model, tok, delta, cfg, full)
            t_edit = time.perf_counter() - t0
            if delta is not None and args.save_deltas:  # before the evaluation: a long run's edit survives its loss
                delta.save(Path(args.save_deltas) / f"{run['name']}-{dname}", overwrite=True)
            if res is not None:
                cert = {k: budget[k] for k in ("max_kl", "scale", "kl_nats_per_token", "kl_unscaled")} if budget else None
                print(f"{run['name']} {dname}: edited in {t_edit:.0f} s, {res.steps} steps, final loss "
                      f"{res.epoch_losses[-1] if res.epoch_losses else float('nan'):.4f}, KL budget {cert}", flush=True)
            t1 = time.perf_counter()
            edited_is_base = method == "none"
            judged_index = evenly_spaced(range(len(requests)), args.eval_sample)
            judged = [requests[j] for j in judged_index]
            em = evaluate_edits(model, tok, judged, base_model=None if edited_is_base else base,
                                teacher_forced=False, generated_contexts=contexts,
                                generation_batch_size=args.gen_batch, show_progress=False, base_memo=memo)
            t_eval = time.perf_counter() - t1
            cap = capability_metrics(base, None if edited_is_base else model, heldout.sequences, 8, False,
                                     pad_id_of(tok))
            bench = {b: run_mc_benchmark(b, model, tok, args.benchmark_limit, 0, None, 16) for b in benches}
            rep = build_report(edit=em, capability=cap.to_json(), benchmarks=bench, config=run)
            if delta is not None:
                delta.revert(model)
            record = {"run": run, "data": dname, "n": len(requests), "n_judged": len(judged), "targets": targets,
                      "summary": rep.summary,
                      "steps": res.steps if res else 0, "stopped": res.stopped if res else None,
                      "final_loss": res.epoch_losses[-1] if res and res.epoch_losses else None,
                      "edit_seconds": t_edit, "eval_seconds": t_eval, "budget": budget,
                      "training_sequences": delta.record.get("training_sequences") if delta else None,
                      "forward": delta.record.get("forward") if delta else None,
                      "diagnostics": delta.record.get("diagnostics") if delta else None,
                      "device": args.device, "dtype": args.dtype,
                      "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
                      # the whole process so far (two models, the cache, every earlier run), not this edit alone
                      "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
            if chunk_log is not None:
                record["chunks"] = chunk_reliability(em["per_request"], chunk_log, judged_index)
            if not args.slim:
                record["per_request"] = em["per_request"]
            results.add(record)
            print_row(run, dname, rep.summary, res.steps if res else 0, t_edit, t_eval)


def print_row(run: dict, dname: str, s: dict, steps, t_edit: float, t_eval: float) -> None:
    def f(k):
        v = s.get(k)
        return "  – " if v is None else f"{v:.2f}"

    print(f"{run['name']:>28s} {dname:5s} rel qa {f('reliability_gen_qa')} chat "
          f"{f('reliability_gen_chat_contains')} raw {f('reliability_gen_raw')} | gen qa "
          f"{f('generalization_gen_qa_contains')} | loc1 qa {f('locality_gen_qa_first_token')}"
          f" | ppl {s.get('perplexity_increase_pct'):+.1f}% KL {s.get('kl_nats_per_token'):.3f} | "
          f"{steps} steps {t_edit:.0f}+{t_eval:.0f} s", flush=True)


def edit_one_at_a_time(run, dname, requests, model, base, tok, full, heldout, fields, contexts, args, memo) -> dict:
    """Each request edited alone from the base model, evaluated, reverted; numeric summary keys are the means over
    the single edits (for the per-request proportions that is the pooled proportion)."""
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from crispedit.evaluation.capability import capability_metrics
    from crispedit.evaluation.edit_metrics import evaluate_edits
    from crispedit.evaluation.generation import pad_id_of
    from crispedit.evaluation.report import build_report
    from crispedit.models.targets import resolve_targets

    cfg = EditConfig(**fields)
    targets = resolve_targets(model, run.get("layers"))
    cur = full.select(targets) if cfg.method in ("crispedit", "adam-nscl") else None
    summaries, per_request, steps, losses, t_edit, t_eval = [], [], [], [], 0.0, 0.0
    for req in requests:
        t0 = time.perf_counter()
        res = edit(model, tok, [req], targets, cfg, curvature=cur, progress=False)
        t_edit += time.perf_counter() - t0
        t1 = time.perf_counter()
        em = evaluate_edits(model, tok, [req], base_model=base, teacher_forced=False, generated_contexts=contexts,
                            generation_batch_size=args.gen_batch, show_progress=False, base_memo=memo)
        cap = capability_metrics(base, model, heldout.sequences, 8, False, pad_id_of(tok))
        t_eval += time.perf_counter() - t1
        res.delta.revert(model)
        summaries.append(build_report(edit=em, capability=cap.to_json(), config=run).summary)
        per_request += em["per_request"]
        steps.append(res.steps)
        losses.append(res.epoch_losses[-1])
    keys = [k for k, v in summaries[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {k: sum(s[k] for s in summaries if s.get(k) is not None) / max(1, sum(s.get(k) is not None
               for s in summaries)) for k in keys}
    summary["n_requests"] = len(requests)
    record = {"run": run, "data": dname, "n": len(requests), "targets": targets, "summary": summary,
              "steps": sum(steps), "steps_per_edit": steps, "final_losses": losses, "stopped": "single",
              "final_loss": sum(losses) / len(losses), "edit_seconds": t_edit, "eval_seconds": t_eval,
              "device": args.device, "dtype": args.dtype}
    if not args.slim:
        record["per_request"] = per_request
    return record


if __name__ == "__main__":
    main()
