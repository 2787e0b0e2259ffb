"""Reliability against the KL budget ε: one edit, then for each ε the edit backed off to its certificate
(`crispedit.editing.budget.enforce_kl_budget`) and evaluated in the wild; JSON lines plus a PNG.

    python scripts/kl_budget_curve.py --cache CACHE --recipe chosen.json --data cf=PATH:100 \\
        --eps 0.002,0.005,0.01,0.02,0.05 --out runs/kl_budget.jsonl --png docs/results/kl_budget.png
    python scripts/kl_budget_curve.py --replot runs/kl_budget.jsonl --png docs/results/kl_budget.png

`--delta DIR` backs off a saved delta (e.g. one written by `wild_ablation.py --save-deltas`) instead of editing;
`--no-full` skips the evaluation of the unscaled edit (ε = none); `--eval-sample K` judges K evenly spaced requests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--cache")
    ap.add_argument("--recipe", default=None, help="a run JSON (EditConfig fields + layers); default: the defaults")
    ap.add_argument("--data", metavar="NAME=PATH:N")
    ap.add_argument("--eps", default="0.002,0.005,0.01,0.02,0.05")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--eval-heldout", type=int, default=32, help="a second held-out sample for the reported KL")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--out")
    ap.add_argument("--png", default=None)
    ap.add_argument("--delta", default=None, help="a saved delta folder to back off (no edit is run)")
    ap.add_argument("--no-full", action="store_true", help="do not evaluate the unscaled edit")
    ap.add_argument("--eval-sample", type=int, default=None, metavar="K",
                    help="judge K evenly spaced edited requests instead of all of them (long batches)")
    ap.add_argument("--replot", default=None, metavar="JSONL", help="only draw --png from the rows of an earlier run")
    a = ap.parse_args()
    if a.replot:
        rows = [json.loads(line) for line in Path(a.replot).read_text().splitlines() if line.strip()]
        _plot(rows, Path(a.png))
        return

    if not (a.cache and a.data and a.out):
        ap.error("--cache, --data and --out are required (unless --replot)")
    if a.eval_sample is not None and a.eval_sample < 1:
        raise SystemExit(f"--eval-sample: must be at least 1, got {a.eval_sample}")
    from crispedit.curvature.api import Curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import evenly_spaced, load_requests
    from crispedit.editing.budget import enforce_kl_budget
    from crispedit.editing.config import EditConfig
    from crispedit.editing.delta import EditDelta
    from crispedit.editing.engine import edit
    from crispedit.evaluation.capability import capability_metrics
    from crispedit.evaluation.edit_metrics import evaluate_edits
    from crispedit.evaluation.generation import pad_id_of
    from crispedit.evaluation.report import build_report
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets, target_weight

    run = json.loads(Path(a.recipe).read_text()) if a.recipe else {}
    fields = {k: v for k, v in run.items() if k not in ("name", "layers", "note", "max_kl")}
    name, rest = a.data.split("=", 1)
    path, n = rest.rsplit(":", 1)
    requests = load_requests(path, limit=int(n), skip_invalid=True)
    model, tok = load_model(a.model, device=a.device)
    base, _ = load_model(a.model, device=a.device)
    saved = EditDelta.load(a.delta) if a.delta else None
    # a saved delta names its own layers; an edit run takes the recipe's (default: the model type's)
    targets = list(saved.deltas) if saved is not None else resolve_targets(model, run.get("layers"))
    cur = Curvature.load(a.cache, device="cpu").select(targets)
    # the budget is enforced on one held-out sample and reported on another (both unseen by the curvature)
    held = build_corpus(tok, None, n_samples=a.heldout + a.eval_heldout, max_length=256, split="heldout")
    budget_seqs, report_seqs = held.sequences[:a.heldout], held.sequences[a.heldout:]
    t = time.perf_counter()
    if saved is not None:  # the model holds its base weights
        t_edit = saved.record.get("seconds")
    else:
        saved = edit(model, tok, requests, targets, EditConfig(**fields), curvature=cur, progress=False).delta
        t_edit = time.perf_counter() - t
        saved.revert(model)
    full = {n_: d.clone() for n_, d in saved.deltas.items()}
    record = dict(saved.record)
    base_w = {n_: target_weight(model, n_).detach().clone() for n_ in targets}
    memo: dict = {}
    judged = evenly_spaced(requests, a.eval_sample)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in ([] if a.no_full else [None]) + [float(x) for x in a.eps.split(",")]:
        delta = EditDelta.from_base(model, base_w, full, dict(record))  # the model now holds the full edit
        cert = None if eps is None else enforce_kl_budget(model, delta, budget_seqs, eps, pad_id=pad_id_of(tok))
        em = evaluate_edits(model, tok, judged, base_model=base, teacher_forced=False,
                            generated_contexts=("qa", "chat", "raw"), generation_batch_size=a.gen_batch,
                            base_memo=memo)
        cap = capability_metrics(base, model, report_seqs, 8, False, pad_id_of(tok))
        s = build_report(edit=em, capability=cap.to_json()).summary
        row = {"eps": eps, "scale": cert["scale"] if cert else 1.0,
               "kl_certified": cert["kl_nats_per_token"] if cert else None,
               "evaluations": [{"scale": e["scale"], "kl": e["kl_nats_per_token"]} for e in cert["evaluations"]]
               if cert else None, "summary": s, "data": name,
               "n": len(requests), "n_judged": len(judged), "edit_seconds": t_edit, "recipe": run, "delta": a.delta}
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"eps {eps} scale {row['scale']:.3f} KL(report) {s['kl_nats_per_token']:.4f} rel qa "
              f"{s.get('reliability_gen_qa')} chat {s.get('reliability_gen_chat_contains')}", flush=True)
        delta.revert(model)
    if a.png:
        _plot(rows, Path(a.png))


def _plot(rows: list[dict], png: Path) -> None:
    from crispedit.evaluation.plots import _figure

    fig = _figure((6.0, 4.2))
    ax = fig.subplots()
    pts = sorted([r for r in rows if r["eps"] is not None], key=lambda r: r["eps"])
    xs = [r["eps"] for r in pts]
    for key, label in (("reliability_gen_qa", "reliability, QA context"),
                       ("reliability_gen_chat_contains", "reliability, chat (contains)"),
                       ("generalization_gen_qa_contains", "rephrase, QA context (contains)"),
                       ("locality_gen_qa_first_token", "locality, first token (QA)")):
        ax.plot(xs, [r["summary"].get(key) for r in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("KL budget ε (nats/token, held-out text)")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
