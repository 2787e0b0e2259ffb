"""Ablation of the edit recipe, judged in the wild (issue: edits that hold in the wild).

Each run edits the first N requests of each dev set with one configuration, evaluates the generated answers
(WILD QA context, chat template, raw prompt; reliability on the edit prompt, generalisation on the rephrase,
locality on the neighbourhood/NQ prompt against the base model), held-out perplexity and KL, and reverts the
edit bit-exactly before the next run. One model load, one curvature cache for all layers (any subset is selected
from it), the base model's generations memoised across runs. Results: one JSON per (run, data set) in OUT; finished
ones are skipped, so the script can be stopped and restarted.

    python scripts/wild_ablation.py --cache runs/cache-all --runs scripts/ablation_runs.json --out runs/ablate \\
        --data cf=../shared/data/counterfact/counterfact-edit.json:100 --data zsre=../shared/data/zsre/zsre_mend_800.json:100

A run is a JSON object: {"name": ..., "layers": "model.layers.{10-12}.mlp.down_proj", plus any EditConfig field
(method, gamma, lr, epochs, contexts, prefixes, ...)}; `max_kl` applies the KL budget after editing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache", required=True, help="curvature cache covering every layer a run may use")
    p.add_argument("--runs", required=True, help="JSON file: a list of runs")
    p.add_argument("--only", default=None, help="comma list of run names to do (default: all)")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH:N")
    p.add_argument("--out", required=True)
    p.add_argument("--heldout", type=int, default=32, help="held-out Wikipedia chunks for perplexity/KL")
    p.add_argument("--contexts", default="qa,chat,raw")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gen-batch", type=int, default=32)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from crispedit.curvature.api import Curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.editing.config import EditConfig
    from crispedit.editing.engine import edit
    from crispedit.evaluation.capability import capability_metrics
    from crispedit.evaluation.edit_metrics import evaluate_edits
    from crispedit.evaluation.generation import pad_id_of
    from crispedit.evaluation.report import build_report
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    for run in runs:
        for dname, requests in data.items():
            dest = out / f"{run['name']}__{dname}.json"
            if dest.exists():
                continue
            cfg_fields = {k: v for k, v in run.items() if k not in ("name", "layers", "max_kl", "note")}
            cfg = EditConfig(**cfg_fields)
            targets = resolve_targets(model, run.get("layers"))
            cur = full.select(targets) if cfg.method != "ft" else None
            t0 = time.perf_counter()
            res = edit(model, tok, requests, targets, cfg, curvature=cur, progress=False)
            t_edit = time.perf_counter() - t0
            budget = None
            if run.get("max_kl") is not None:
                from crispedit.editing.budget import enforce_kl_budget

                budget = enforce_kl_budget(model, res.delta, heldout.sequences, float(run["max_kl"]),
                                           pad_id=pad_id_of(tok))
            t1 = time.perf_counter()
            em = evaluate_edits(model, tok, requests, base_model=base, teacher_forced=False,
                                generated_contexts=contexts, generation_batch_size=args.gen_batch,
                                show_progress=False, base_memo=memo)
            t_eval = time.perf_counter() - t1
            cap = capability_metrics(base, model, heldout.sequences, 8, False, pad_id_of(tok))
            rep = build_report(edit=em, capability=cap.to_json(), config=run)
            res.delta.revert(model)
            record = {"run": run, "data": dname, "n": len(requests), "targets": targets,
                      "summary": rep.summary, "steps": res.steps, "stopped": res.stopped,
                      "final_loss": res.epoch_losses[-1] if res.epoch_losses else None,
                      "edit_seconds": t_edit, "eval_seconds": t_eval, "budget": budget,
                      "training_sequences": res.delta.record.get("training_sequences"),
                      "forward": res.delta.record.get("forward"),
                      "per_request": em["per_request"]}
            dest.write_text(json.dumps(record, indent=1) + "\n")
            s = rep.summary
            print(f"{run['name']:>28s} {dname:5s} rel qa {s.get('reliability_gen_qa'):.2f} chat "
                  f"{s.get('reliability_gen_chat_contains'):.2f} raw {s.get('reliability_gen_raw'):.2f} | gen qa "
                  f"{s.get('generalization_gen_qa_contains'):.2f} | loc1 qa {s.get('locality_gen_qa_first_token'):.2f}"
                  f" | ppl {s.get('perplexity_increase_pct'):+.1f}% KL {s.get('kl_nats_per_token'):.3f} | "
                  f"{res.steps} steps {t_edit:.0f}+{t_eval:.0f} s", flush=True)


if __name__ == "__main__":
    main()
