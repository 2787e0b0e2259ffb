"""`crispedit eval` (an edited model against its base → report JSON + Markdown) and `crispedit compare`.

The options are `EvalConfig`'s, `RequestsConfig`'s and the held-out corpus (`CorpusConfig`, with eval's own
sizes: 64 chunks, 0 to skip)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crispedit.cli.common import Command, UsageError, add_config_options, config_from_args, echo
from crispedit.config import CorpusConfig, EvalConfig, LoadConfig, RequestsConfig

HELDOUT = {"n_samples": {"default": 64, "low": 0, "flag": "--heldout-samples",
                         "help": "held-out chunks for perplexity and KL (0: skip)"},
           "source": {"default": "wikipedia", "help": "capability text; its held-out split (never seen by the "
                                                      "curvature) gives perplexity and KL"}}


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the edited model (a folder written by `crispedit edit` — its model/ — or any model spec)")
    p.add_argument("--base", metavar="M", help="the base model it was edited from (omit to evaluate a model alone)")
    p.add_argument("--delta", metavar="DIR", help="instead of an edited model folder: apply this delta to --base")
    add_config_options(p, LoadConfig)
    p.add_argument("--edits", metavar="PATH", help="the edit requests (any supported format)")
    add_config_options(p, RequestsConfig)
    add_config_options(p, CorpusConfig, only=("source", "n_samples", "max_length"), overrides=HELDOUT)
    add_config_options(p, EvalConfig)
    p.add_argument("--label", default=None, help="run name in tables and plots")
    p.add_argument("--out", required=True, metavar="REPORT.json")


def run_eval(args: argparse.Namespace) -> int:
    from crispedit.cli.common import load_model_from_args
    from crispedit.data.corpus import build_corpus
    from crispedit.data.readers import load_requests
    from crispedit.editing.run import MODEL_DIR, is_edit_run, read_run_record
    from crispedit.evaluation.report import write_report
    from crispedit.evaluation.runner import evaluate
    from crispedit.io import check_report_output

    if args.delta and not args.base:
        raise UsageError("--delta needs --base (the model the delta applies to)")
    check_report_output(args.out, inputs=[args.model, args.base, args.delta, args.edits])
    rc = config_from_args(args, RequestsConfig)
    cfg = config_from_args(args, EvalConfig, show_progress=True)
    requests = load_requests(args.edits, fmt=rc.format, limit=rc.limit,
                             skip_invalid=rc.skip_invalid) if args.edits else []
    run_config: dict = {}
    model_dir: Path | None = Path(args.model)
    if args.delta:
        from crispedit.editing.delta import EditDelta

        edited, tok = load_model_from_args(args, spec=args.base)
        delta = EditDelta.load(args.delta)
        delta.apply(edited)
        run_config = dict(delta.record.get("config", {}))
        model_dir = None
    else:
        if is_edit_run(model_dir):  # a `crispedit edit` output folder: use its model/ and its run record
            run_config = dict(read_run_record(model_dir).get("config", {}))
            model_dir = model_dir / MODEL_DIR
        edited, tok = load_model_from_args(args, spec=str(model_dir))
    base = load_model_from_args(args, spec=args.base)[0] if args.base else None
    if args.label:
        run_config["label"] = args.label
    run_config.update(model=str(args.model), base=args.base, edits=args.edits)
    heldout = None
    if args.n_samples:
        heldout = build_corpus(tok, args.source, n_samples=args.n_samples, max_length=args.max_length,
                               seed=cfg.benchmark_seed, split="heldout")
    report = evaluate(edited, base, tok, requests, heldout, cfg, run_config=run_config,
                      edited_path=str(model_dir) if model_dir is not None else None)
    js, md = write_report(report, args.out)
    from crispedit.evaluation.report import HEADLINE_KEYS

    s = report.summary
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
        keys = () if args.plot_y.strip().lower() == "none" else tuple(k.strip() for k in args.plot_y.split(",")
                                                                       if k.strip())
        plot_tradeoff(args.reports, args.plot, y_key=keys or ("reliability_gen_qa",))
        echo(f"plot → {args.plot}")
    return 0


COMMANDS = [
    Command("eval", "evaluate an edited model against its base (edits, perplexity, KL, benchmarks)",
            add_eval_arguments, run_eval),
    Command("compare", "put several evaluation reports side by side", add_compare_arguments, run_compare),
]
