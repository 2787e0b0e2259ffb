"""`crispedit edit`: batch or sequential editing with CrispEdit, Adam-NSCL or plain fine-tuning.

The options are `EditConfig`'s hyper-parameters, `EditJob`'s run options and `RequestsConfig`. All checks that
need no model (files, option values, the output folder) run before the model loads; the output folder is
written in one atomic rename, so a failed or diverged run leaves nothing behind."""

from __future__ import annotations

import argparse
from pathlib import Path

from crispedit.cli.common import (
    Command,
    UsageError,
    add_config_options,
    add_model_options,
    config_from_args,
    echo,
    format_table,
)
from crispedit.config import EditConfig, RequestsConfig
from crispedit.editing.run import EditJob

EDITS_HELP = "edit requests: CounterFact/EasyEdit JSON, zsRE (MEND) JSON, WikiBigEdit JSON or crispedit JSONL"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--edits", required=True, metavar="PATH", help=EDITS_HELP)
    add_config_options(p, RequestsConfig)
    add_config_options(p, EditJob)
    add_config_options(p, EditConfig)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (delta/, model/, run.json)")
    p.add_argument("--force", action="store_true", default=False, help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from crispedit.cli.common import load_model_from_args
    from crispedit.curvature.cache import read_record
    from crispedit.data.readers import load_requests
    from crispedit.editing.run import check_edit_output, run_edit
    from crispedit.models.loading import model_source_path

    out = Path(args.out)
    cfg = config_from_args(args, EditConfig)
    check_edit_output(out, args.force, [model_source_path(args.model), args.curvature_path, args.edits, args.state_dir])
    if cfg.projection is not None and not args.curvature_path:
        raise UsageError(f"--method {cfg.method} needs --curvature CACHE (build one with `crispedit curvature`)")
    if args.resume and not args.sequential:
        raise UsageError("--resume continues a sequential state: add --sequential")
    if args.curvature_path:
        read_record(args.curvature_path)  # fails fast on a missing or foreign cache
    rc = config_from_args(args, RequestsConfig)
    requests = load_requests(args.edits, fmt=rc.format, limit=rc.limit, skip_invalid=rc.skip_invalid)
    if "chat" in cfg.contexts:
        from crispedit.formatting import has_chat_template
        from crispedit.models.loading import peek_tokenizer

        peek = peek_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        if peek is not None and not has_chat_template(peek):
            raise UsageError(f"training context 'chat' needs a tokenizer with a chat template, and {args.model}'s "
                             "has none; drop chat from --contexts")
    model, tok = load_model_from_args(args)
    job = config_from_args(args, EditJob, requests=requests, cfg=cfg,
                           source={"path": str(args.edits), "format": rc.format})
    rec = run_edit(model, tok, job, out, overwrite=args.force, progress=True)
    rows = [[n, f"{d.get('norm', 0):.4g}", f"{d.get('removed_energy_fraction', float('nan')):.2e}",
             f"{d.get('kfac_quadratic_form', float('nan')):.3g}"] for n, d in rec["diagnostics"].items()]
    echo(format_table(["target", "‖ΔW‖", "share in removed dirs", "½ΔᵀGΔ (K-FAC)"], rows))
    losses = rec["step_losses"]
    echo(f"{len(requests)} edits, {len(losses)} steps, final loss {losses[-1] if losses else float('nan'):.4f}, "
         f"{rec['seconds_total']:.1f} s → {out}")
    return 0


COMMANDS = [Command("edit", "edit a model (CrispEdit, Adam-NSCL or FT; batch or --sequential)", add_arguments, run)]
