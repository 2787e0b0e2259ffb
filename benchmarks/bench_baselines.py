"""Benchmark of the baseline editors (MEMIT, AlphaEdit, UltraEdit, MEND) on the embedded SmolLM2-135M-Instruct
(not a test: it prints and writes measurements).

For one method and config it edits the first N CounterFact edit requests, then reports:
  - wall time of the edit (seconds, as the delta records it, with the method's own timings) and the process's
    CPU time over the same span (equal to the wall time of an unshared core: the figure to compare when the
    machine is shared);
  - generated reliability of the edited target (greedy decoding, `evaluate_edits(teacher_forced=False)`) under
    the raw prompt and the QA context: exact match, prefix match; and generated locality (same as base);
  - the target's mean token NLL after the raw prompt before and after the edit (teacher-forced);
  - held-out perplexity of the base and edited model and KL(base ‖ edited) (wiki held-out split);
and appends one JSON line to --out.

    python benchmarks/bench_baselines.py memit --curvature /work/cache-base --n 100 \
        [--layers model.layers.{10-12}.mlp.down_proj] [--set mom2_weight=15000 ...] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def target_nll(model, tok, requests) -> float:
    from crispedit.baselines.mend import edit_batch, per_request_nll

    out = []
    with torch.no_grad():
        for s in range(0, len(requests), 16):
            b = edit_batch(tok, requests[s : s + 16], "cpu")
            out += per_request_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   b["targets"]).tolist()
    return sum(out) / len(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("method")
    p.add_argument("--curvature", default=None)
    p.add_argument("--layers", default=None)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--edits", default=str(COUNTERFACT))
    p.add_argument("--set", nargs="*", default=[], help="config overrides field=value")
    p.add_argument("--contexts", default="raw,qa")
    p.add_argument("--heldout", type=int, default=16, help="held-out sequences for perplexity/KL (0 = skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from crispedit.baselines import config_class, run_baseline, validate
    from crispedit.curvature.api import Curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.evaluation.capability import capability_metrics
    from crispedit.evaluation.edit_metrics import evaluate_edits
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets

    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = config_class(args.method)(**{k: _value(v) for k, v in overrides.items()})
    requests = load_requests(args.edits, limit=args.n)
    validate(args.method, requests, cfg, curvature=args.curvature)
    model, tok = load_model("smollm2-135m-instruct")
    targets = resolve_targets(model, args.layers) if args.layers else None
    cur = Curvature.load(args.curvature, model=model) if args.curvature else None
    contexts = tuple(c for c in args.contexts.split(",") if c)
    heldout = build_corpus(tok, None, n_samples=args.heldout, max_length=128, split="heldout").sequences \
        if args.heldout else None
    nll_before = target_nll(model, tok, requests)
    import copy

    base_model = copy.deepcopy(model) if heldout or contexts else None
    t0, c0 = time.perf_counter(), time.process_time()
    delta = run_baseline(args.method, model, tok, requests, cur, cfg, targets=targets, progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    nll_after = target_nll(model, tok, requests)
    row = {"method": args.method, "tag": args.tag, "n": len(requests), "config": delta.record["config"],
           "targets": delta.record.get("targets_edited"), "seconds": delta.record["seconds"], "wall": wall,
           "cpu_seconds": cpu,
           "timings": delta.record["timings"], "threads": args.threads,
           "target_nll_before": nll_before, "target_nll_after": nll_after,
           "update_relative_norm": {n: d["relative_norm"] for n, d in delta.record["diagnostics"].items()},
           "chunks": [{k: v for k, v in c.items() if k != "layers"} for c in delta.record.get("chunks", [])]}
    if contexts:
        t1 = time.perf_counter()
        ev = evaluate_edits(model, tok, requests, base_model, teacher_forced=False, generated_contexts=contexts,
                            show_progress=False)
        agg = ev["aggregate"]
        row["generated"] = {c: {"reliability_exact": agg["reliability"]["generated"][c]["exact_match"],
                                "reliability_prefix": agg["reliability"]["generated"][c]["prefix_match"],
                                "generalization_prefix": agg["generalization"]["generated"][c]["prefix_match"],
                                "locality_same_as_base": agg["locality"]["generated"][c]["same_as_base"]}
                            for c in contexts}
        row["eval_seconds"] = time.perf_counter() - t1
    if heldout:
        cm = capability_metrics(base_model, model, heldout, batch_size=4)
        row["perplexity_base"], row["perplexity_edited"] = cm.perplexity_base, cm.perplexity_edited
        row["kl_nats_per_token"] = cm.kl_nats_per_token
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
