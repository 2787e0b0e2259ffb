"""The small measurements behind the baselines' SmolLM2 defaults (not a test: it prints and appends JSON lines).

`locate`: MEMIT (for each λ) and AlphaEdit (defaults) on each contiguous block of down-projections, N CounterFact
edits; the target values are optimised once per block (they depend on the last edited layer only) and reused.
`ultraedit`: UltraEdit for each learning rate on the given layers (default: its own gate/up layers).

Reported per run: target NLL and teacher-forced all-tokens-correct rate after the raw prompt (reliability) and
after the first rephrase (generalisation), held-out KL(base ‖ edited) on 8 wiki chunks, update norms.

    python benchmarks/sweep_baselines.py locate --curvature runs/cache-all --n 12 \
        --blocks 2-4 6-8 10-12 14-16 --lams 15000 1500
    python benchmarks/sweep_baselines.py ultraedit --n 20 --lrs 1e-5 1e-4 1e-3 [--layers SPEC]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def teacher_forced(model, tok, requests) -> tuple[float, float]:
    """(mean target NLL, share of requests whose every target token is the argmax)."""
    from crispedit.baselines.mend import edit_batch, per_request_nll

    b = edit_batch(tok, requests, "cpu")
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mask = b["targets"] != -100
    ok = ((logits.argmax(-1) == b["targets"]) | ~mask).all(1).float()
    return round(float(per_request_nll(logits, b["targets"]).mean()), 3), round(float(ok.mean()), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("locate", "ultraedit"))
    p.add_argument("--curvature", default=None)
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--blocks", nargs="*", default=["2-4", "6-8", "10-12", "14-16"])
    p.add_argument("--lams", nargs="*", type=float, default=[15000.0, 1500.0])
    p.add_argument("--lrs", nargs="*", type=float, default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--layers", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)

    import crispedit.baselines.memit as memit
    from crispedit.baselines import AlphaEditConfig, MemitConfig, UltraEditConfig, run_baseline
    from crispedit.curvature.api import Curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.data.records import EditRequest
    from crispedit.evaluation.capability import capability_metrics
    from crispedit.models.loading import load_model
    from crispedit.models.targets import resolve_targets

    model, tok = load_model("smollm2-135m-instruct")
    base_model = copy.deepcopy(model)
    requests = load_requests(COUNTERFACT, limit=args.n)
    rephrases = [EditRequest(r.rephrases[0], r.target) for r in requests]
    heldout = build_corpus(tok, None, n_samples=8, max_length=128, split="heldout").sequences
    print(json.dumps({"base": {"reliability": teacher_forced(model, tok, requests),
                               "generalization": teacher_forced(model, tok, rephrases)}}), flush=True)

    def report(row: dict, delta) -> None:
        row.update(reliability=teacher_forced(model, tok, requests),
                   generalization=teacher_forced(model, tok, rephrases),
                   kl=round(capability_metrics(base_model, model, heldout, batch_size=4).kl_nats_per_token, 5),
                   relative_norm=[round(d["relative_norm"], 4) for d in delta.record["diagnostics"].values()],
                   seconds=round(delta.record["seconds"], 1))
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        delta.revert(model)

    if args.what == "ultraedit":
        targets = resolve_targets(model, args.layers) if args.layers else None
        for lr in args.lrs:
            d = run_baseline("ultraedit", model, tok, requests, None, UltraEditConfig(lr=lr), targets=targets)
            report({"method": "ultraedit", "lr": lr, "layers": args.layers or "default", "n": args.n}, d)
        return

    cur = Curvature.load(args.curvature, model=model)
    values: dict[str, object] = {}
    optimize = memit.optimize_values

    def once_per_block(model_, tok_, reqs, block, prefixes, settings, offset):
        if block not in values:
            values[block] = optimize(model_, tok_, reqs, block, prefixes, settings, offset)
        return values[block]

    memit.optimize_values = once_per_block  # the same values for every λ and for AlphaEdit on one block
    for spec in args.blocks:
        lo, hi = (int(x) for x in spec.split("-"))
        targets = [f"model.layers.{i}.mlp.down_proj" for i in range(lo, hi + 1)]
        runs = [("memit", MemitConfig(mom2_weight=lam)) for lam in args.lams] + [("alphaedit", AlphaEditConfig())]
        for name, cfg in runs:
            d = run_baseline(name, model, tok, requests, cur, cfg, targets=targets)
            c = d.record["chunks"][0]
            report({"method": name, "block": spec, "lam": getattr(cfg, "mom2_weight", None), "n": args.n,
                    "z_error_after": round(c["z_error_after_mean"], 2), "z_delta": round(c["z_delta_mean"], 2),
                    "null_space_dim": d.record.get("null_space_dim")}, d)


if __name__ == "__main__":
    main()
