"""`crispedit eval` (an edited model against its base → report JSON + Markdown) and `crispedit compare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crispedit.cli.common import Command, UsageError, add_loading_options, echo, nonnegative_int, positive_int


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the edited model (a folder written by `crispedit edit` — its model/ — or any model spec)")
    p.add_argument("--base", metavar="M", help="the base model it was edited from (omit to evaluate a model alone)")
    p.add_argument("--delta", metavar="DIR", help="instead of an edited model folder: apply this delta to --base")
    add_loading_options(p)
    p.add_argument("--edits", metavar="PATH", help="the edit requests (any supported format)")
    p.add_argument("--format", default="auto")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N requests")
    p.add_argument("--skip-invalid", action="store_true", default=False)
    p.add_argument("--corpus", default="wikipedia",
                   help="capability text; its held-out split (never seen by the curvature) gives perplexity and KL")
    p.add_argument("--heldout-samples", type=nonnegative_int, default=64, help="held-out chunks (0: skip)")
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--contexts", default="auto",
                   help="generated-evaluation contexts: qa, chat, raw (comma list); auto = all three, chat only "
                        "when the tokenizer has a chat template")
    p.add_argument("--teacher-forced-context", default="raw", choices=("raw", "qa", "chat"))
    p.add_argument("--benchmarks", default="mmlu,arc,truthfulqa", help="comma list, or 'none'")
    p.add_argument("--benchmark-limit", type=positive_int, default=200)
    p.add_argument("--benchmarks-root", default=None, help="folder with mmlu/ arc/ truthfulqa/ gsm8k/")
    p.add_argument("--benchmarks-on-base", action="store_true", default=False)
    p.add_argument("--gsm8k", action="store_true", default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--label", default=None, help="run name in tables and plots")
    p.add_argument("--out", required=True, metavar="REPORT.json")


def _split(text: str | None) -> tuple[str, ...]:
    if not text or text.strip().lower() == "none":
        return ()
    return tuple(x.strip() for x in text.split(",") if x.strip())


def run_eval(args: argparse.Namespace) -> int:
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.evaluation.report import write_report
    from crispedit.evaluation.runner import EvalConfig, evaluate
    from crispedit.models.loading import load_model

    if args.delta and not args.base:
        raise UsageError("--delta needs --base (the model the delta applies to)")
    requests = load_requests(args.edits, fmt=args.format, limit=args.limit,
                             skip_invalid=args.skip_invalid) if args.edits else []
    cfg = EvalConfig(teacher_forced_context=args.teacher_forced_context, generated_contexts=_split(args.contexts),
                     benchmarks=_split(args.benchmarks), benchmark_limit=args.benchmark_limit,
                     benchmark_seed=args.seed, benchmarks_root=args.benchmarks_root,
                     benchmarks_on_base=args.benchmarks_on_base, gsm8k=args.gsm8k, batch_size=args.batch_size)
    kw = dict(device=args.device, dtype=args.dtype, device_map=args.device_map,
              trust_remote_code=args.trust_remote_code)
    run_config: dict = {}
    model_dir = Path(args.model)
    if args.delta:
        from crispedit.editing.delta import EditDelta

        edited, tok = load_model(args.base, **kw)
        delta = EditDelta.load(args.delta)
        delta.apply(edited)
        run_config = dict(delta.record.get("config", {}))
    else:
        # A `crispedit edit` output folder: use its model/ and its run record.
        if (model_dir / "run.json").is_file() and (model_dir / "model").is_dir():
            run_config = dict(json.loads((model_dir / "run.json").read_text()).get("config", {}))
            model_dir = model_dir / "model"
        edited, tok = load_model(str(model_dir), **kw)
    base = load_model(args.base, **kw)[0] if args.base else None
    if args.label:
        run_config["label"] = args.label
    run_config.update(model=str(args.model), base=args.base, edits=args.edits)
    heldout = None
    if args.heldout_samples:
        heldout = build_corpus(tok, args.corpus, n_samples=args.heldout_samples, max_length=args.max_length,
                               seed=args.seed, split="heldout")
    report = evaluate(edited, base, tok, requests, heldout, cfg, run_config=run_config)
    js, md = write_report(report, args.out)
    s = report.summary
    from crispedit.evaluation.report import HEADLINE_KEYS

    echo(" ".join(f"{k}={s[k]:.4g}" for k in HEADLINE_KEYS if s.get(k) is not None))
    echo(f"report → {js} (and {md})")
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("--plot", metavar="PNG", help="also draw edit success against capability change")
    p.add_argument("--plot-y", default="reliability_gen_qa,locality_gen_qa_first_token", metavar="KEYS",
                   help="summary metrics on the plot's y axes, one row of panels each (comma list)")
    p.add_argument("--out", metavar="MD", help="write the table to this Markdown file")


def run_compare(args: argparse.Namespace) -> int:
    from crispedit.evaluation.plots import plot_tradeoff
    from crispedit.evaluation.report import compare_reports
    from crispedit.io import atomic_path

    table = compare_reports(args.reports)
    echo(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    if args.plot:
        plot_tradeoff(args.reports, args.plot, y_key=_split(args.plot_y) or ("reliability_gen_qa",))
        echo(f"plot → {args.plot}")
    return 0


COMMANDS = [
    Command("eval", "evaluate an edited model against its base (edits, perplexity, KL, benchmarks)",
            add_eval_arguments, run_eval),
    Command("compare", "put several evaluation reports side by side", add_compare_arguments, run_compare),
]
