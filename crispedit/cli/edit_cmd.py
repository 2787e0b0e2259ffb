"""`crispedit edit`: batch or sequential editing with CrispEdit, Adam-NSCL or plain fine-tuning.

All checks that need no model (files, option values, the output folder) run before the model loads; the
output folder is written in one atomic rename, so a failed or diverged run leaves nothing behind."""

from __future__ import annotations

import argparse
from pathlib import Path

from crispedit.cli.common import Command, UsageError, add_model_options, echo, format_table, fraction, positive_float, positive_int
from crispedit.cli.targets_cmd import LAYERS_HELP

METHODS = ("crispedit", "ft", "adam-nscl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--edits", required=True, metavar="PATH",
                   help="edit requests: CounterFact/EasyEdit JSON, zsRE (MEND) JSON, WikiBigEdit JSON or crispedit JSONL")
    p.add_argument("--format", default="auto", help="auto, counterfact, zsre, wikibigedit or crispedit")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N requests")
    p.add_argument("--skip-invalid", action="store_true", default=False,
                   help="drop invalid records with a warning instead of stopping")
    p.add_argument("--curvature", metavar="CACHE", help="curvature cache (needed by crispedit and adam-nscl)")
    p.add_argument("--allow-cache-mismatch", action="store_true", default=False,
                   help="use a cache computed for other weights anyway")
    p.add_argument("--layers", metavar="SPEC", help=LAYERS_HELP + " (FT without a cache)")
    p.add_argument("--method", choices=METHODS, default="crispedit")
    p.add_argument("--gamma", type=fraction(), default=0.9, help="energy threshold γ in (0, 1)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="energy threshold per target layer or across all targets")
    p.add_argument("--projection-mode", choices=("eigen", "update", "grad"), default="eigen",
                   help="eigen: Adam in the masked Kronecker eigenbasis (exact); update: project Adam's step; "
                        "grad: project the gradient before Adam (the authors' code; leaks)")
    p.add_argument("--lr", type=positive_float, default=5e-3)
    p.add_argument("--epochs", type=positive_int, default=25)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--early-stop-loss", type=positive_float, default=0.01)
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--chat-template", action="store_true", default=False,
                   help="prompt as the user turn, target as the assistant turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequential", action="store_true", default=False,
                   help="CrispEdit-Seq: edit in chunks, each chunk's statistics become constraints")
    p.add_argument("--chunk-size", type=positive_int, default=100)
    p.add_argument("--edit-weight", type=positive_int, default=1, metavar="N",
                   help="sequential: count each edit token N times when a chunk's statistics are merged "
                        "(protects earlier edits more; a resumed state keeps its own weight)")
    p.add_argument("--state", metavar="DIR", help="sequential state folder (default: OUT.state)")
    p.add_argument("--resume", action="store_true", default=False, help="continue a sequential state")
    p.add_argument("--no-save-model", action="store_true", default=False, help="write only the delta")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (delta/, model/, run.json)")
    p.add_argument("--force", action="store_true", default=False, help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from crispedit.curvature.cache import read_record
    from crispedit.data.readers import load_requests
    from crispedit.editing.config import EditConfig
    from crispedit.editing.run import EditJob, run_edit

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(f"output folder {out} exists and is not empty (choose another, or --force)")
    if args.method != "ft" and not args.curvature:
        raise UsageError(f"--method {args.method} needs --curvature CACHE (build one with `crispedit curvature`)")
    if args.resume and not args.sequential:
        raise UsageError("--resume continues a sequential state: add --sequential")
    if args.curvature:
        read_record(args.curvature)  # fails fast on a missing or foreign cache
    requests = load_requests(args.edits, fmt=args.format, limit=args.limit, skip_invalid=args.skip_invalid)
    cfg = EditConfig(method=args.method, gamma=args.gamma, scope=args.scope, projection_mode=args.projection_mode,
                     lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                     early_stop_loss=args.early_stop_loss, max_steps=args.max_steps,
                     contexts=("chat",) if args.chat_template else ("raw",), seed=args.seed)
    from crispedit.cli.common import load_model_from_args

    model, tok = load_model_from_args(args)
    job = EditJob(requests=requests, cfg=cfg, curvature_path=args.curvature, targets=args.layers,
                  sequential=args.sequential, chunk_size=args.chunk_size, state_dir=args.state, resume=args.resume,
                  edit_weight=args.edit_weight,
                  save_model=not args.no_save_model, allow_cache_mismatch=args.allow_cache_mismatch,
                  source={"path": str(args.edits), "format": args.format})
    rec = run_edit(model, tok, job, out, overwrite=args.force)
    rows = [[n, f"{d.get('norm', 0):.4g}", f"{d.get('removed_energy_fraction', float('nan')):.2e}",
             f"{d.get('kfac_quadratic_form', float('nan')):.3g}"] for n, d in rec["diagnostics"].items()]
    echo(format_table(["target", "‖ΔW‖", "share in removed dirs", "½ΔᵀGΔ (K-FAC)"], rows))
    losses = rec["step_losses"]
    echo(f"{len(requests)} edits, {len(losses)} steps, final loss {losses[-1]:.4f}, "
         f"{rec['seconds_total']:.1f} s → {out}")
    return 0


COMMANDS = [Command("edit", "edit a model (CrispEdit, Adam-NSCL or FT; batch or --sequential)", add_arguments, run)]
