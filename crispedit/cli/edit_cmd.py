"""`crispedit edit`: batch or sequential editing with CrispEdit, Adam-NSCL, plain fine-tuning, LoRA or LocBF-FT, or
with the baselines MEMIT, AlphaEdit, UltraEdit and MEND (`crispedit.baselines`).

The options are `EditConfig`'s hyper-parameters, `EditJob`'s run options, `RequestsConfig`, and each baseline's
config with the method's name before its fields (`--memit-mom2-weight`, `--ultraedit-lr`). A baseline's sequential
variant is `--sequential --chunk-size N` (its config's `chunk_size`); without `--sequential` MEMIT, AlphaEdit and
MEND edit all requests at once and UltraEdit keeps its own lifelong steps (`UltraEditConfig.chunk_size`). All checks
that need no model (files, option values, the output folder, a baseline's `validate`) run before the model loads;
the output folder is written in one atomic rename, so a failed or diverged run leaves nothing behind."""

from __future__ import annotations

import argparse
from pathlib import Path

from crispedit.baselines.config import CONFIGS as BASELINE_CONFIGS
from crispedit.baselines.config import METHODS as BASELINES
from crispedit.cli.common import (
    Command,
    UsageError,
    add_config_options,
    add_model_options,
    cli_spelling,
    config_from_args,
    echo,
    format_table,
    given,
)
from crispedit.config import EditConfig, Method, RequestsConfig, config_fields
from crispedit.editing.run import EditJob

EDITS_HELP = "edit requests: CounterFact/EasyEdit JSON, zsRE (MEND) JSON, WikiBigEdit JSON or crispedit JSONL"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--edits", required=True, metavar="PATH", help=EDITS_HELP)
    add_config_options(p, RequestsConfig)
    add_config_options(p, EditJob)
    method = next(s for s in config_fields(EditConfig) if s.name == "method")
    add_config_options(p, EditConfig, overrides={"method": {
        "cli_choices": (*Method.values(), *BASELINES),
        "help": method.help + "; memit, alphaedit (need --curvature), ultraedit, mend: the closed-form and "
                              "hypernetwork baselines, with their own options below"}})
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (delta/, model/, run.json)")
    p.add_argument("--force", action="store_true", default=False, help="replace an existing output folder")
    for name in BASELINES:
        group = p.add_argument_group(f"--method {name}")
        add_config_options(group, BASELINE_CONFIGS[name], exclude=("chunk_size",), prefix=name)


def run(args: argparse.Namespace) -> int:
    from crispedit.cli.common import load_model_from_args
    from crispedit.curvature.cache import read_record
    from crispedit.data.readers import load_requests
    from crispedit.editing.run import check_edit_output, run_edit
    from crispedit.models.loading import model_source_path

    out = Path(args.out)
    for other in BASELINES:
        if other != str(args.method) and given(args, BASELINE_CONFIGS[other], prefix=other):
            flags = ", ".join(f"--{other}-{k.replace('_', '-')}" for k in given(args, BASELINE_CONFIGS[other], other))
            raise UsageError(f"{flags}: option(s) of --method {other}, not --method {args.method}")
    if str(args.method) in BASELINES:
        return run_baseline_command(args, str(args.method))
    cfg = config_from_args(args, EditConfig)
    check_edit_output(out, args.force, [model_source_path(args.model), args.curvature_path, args.edits, args.state_dir])
    if cfg.projection is not None and not args.curvature_path:
        raise UsageError(f"--method {cfg.method} needs --curvature CACHE (build one with `crispedit curvature`)")
    if args.resume and not args.sequential:
        raise UsageError("--resume continues a sequential state: add --sequential")
    if args.edit_gamma is not None and not args.sequential:
        raise UsageError("--edit-gamma thresholds the edits of earlier chunks: add --sequential")
    if args.edit_gamma is not None and (cfg.projection != "kfac" or cfg.scope != "layer"):
        raise UsageError(f"--edit-gamma needs --method crispedit with --scope layer (not --method {cfg.method}, "
                         f"--scope {cfg.scope})")
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
         f"change trained at {rec['edit_positions']} positions, {rec['seconds_total']:.1f} s → {out}")
    return 0


# EditJob options a baseline run does not take (they belong to CrispEdit-Seq's state).
NOT_FOR_BASELINES = {"state_dir": "--state", "resume": "--resume", "edit_weight": "--edit-weight",
                     "edit_statistics": "--edit-statistics", "edit_gamma": "--edit-gamma"}


def run_baseline_command(args: argparse.Namespace, method: str) -> int:
    """`crispedit edit --method memit|alphaedit|ultraedit|mend`: every check before the model loads, then the job."""
    from crispedit.baselines.api import validate
    from crispedit.baselines.job import run_baseline_edit
    from crispedit.cli.common import load_model_from_args
    from crispedit.curvature.cache import read_record
    from crispedit.data.readers import load_requests
    from crispedit.editing.run import check_edit_output
    from crispedit.models.loading import model_source_path

    out = Path(args.out)
    loop_only = sorted(set(given(args, EditConfig)) - {"method"})
    if loop_only:
        flags = ", ".join(cli_spelling(k, True).split()[0] for k in loop_only)
        raise UsageError(f"{flags}: option(s) of the fine-tuning methods, not of --method {method} (its options are "
                         f"--{method}-...)")
    chosen = getattr(args, "_given", set())
    for field, flag in NOT_FOR_BASELINES.items():
        if field in chosen:
            raise UsageError(f"{flag} is for CrispEdit-Seq's sequential state; --method {method} runs its sequential "
                             "variant with --sequential --chunk-size N in one go")
    if "chunk_size" in chosen and not args.sequential:
        raise UsageError(f"--chunk-size is the sequential variant's: add --sequential (--method {method})")
    check_edit_output(out, args.force, [model_source_path(args.model), args.curvature_path, args.edits])
    fixed = {"chunk_size": args.chunk_size} if args.sequential else {}
    cfg = config_from_args(args, BASELINE_CONFIGS[method], prefix=method, **fixed)
    if method == "mend" and cfg.hypernet is None:
        raise UsageError("--method mend needs --mend-hypernet DIR (a trained hypernetwork: `python -m "
                         "crispedit.baselines.mend_train`)")
    if args.curvature_path:
        read_record(args.curvature_path)  # fails fast on a missing or foreign cache
    rc = config_from_args(args, RequestsConfig)
    requests = load_requests(args.edits, fmt=rc.format, limit=rc.limit, skip_invalid=rc.skip_invalid)
    validate(method, requests, cfg, curvature=args.curvature_path, targets=args.targets, source=str(args.edits))
    model, tok = load_model_from_args(args)
    job = config_from_args(args, EditJob, requests=requests, cfg=EditConfig(),
                           source={"path": str(args.edits), "format": rc.format})
    rec = run_baseline_edit(model, tok, method, cfg, job, out, overwrite=args.force, progress=True)
    rows = [[n, f"{d.get('norm', 0):.4g}", f"{d.get('relative_norm', float('nan')):.2e}",
             f"{d.get('kfac_quadratic_form', float('nan')):.3g}"] for n, d in rec["diagnostics"].items()]
    echo(format_table(["target", "‖ΔW‖", "‖ΔW‖/‖W‖", "½ΔᵀGΔ (K-FAC)"], rows))
    steps = f" in chunks of {cfg.chunk_size}" if rec["sequential"] else ""
    echo(f"{len(requests)} edits with {method}{steps}, {rec['seconds_total']:.1f} s → {out}")
    return 0


COMMANDS = [Command("edit", "edit a model (CrispEdit, Adam-NSCL, FT, LoRA, LocBF-FT or the baselines MEMIT, "
                            "AlphaEdit, UltraEdit, MEND; batch or --sequential)", add_arguments, run)]
