"""`crispedit targets MODEL [--layers SPEC]`: the editable layers of a model, with the targets marked."""

from __future__ import annotations

import argparse

from crispedit.cli.common import MODEL_HELP, Command, UsageError, add_config_options, echo, format_table
from crispedit.config import CurvatureConfig, LoadConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--model", dest="model", metavar="M", help="the same as MODEL")
    add_config_options(p, CurvatureConfig, only=("targets",))
    add_config_options(p, LoadConfig)


def run(args: argparse.Namespace) -> int:
    from crispedit.cli.common import load_model_from_args
    from crispedit.errors import CrispEditError
    from crispedit.models import DEFAULT_TARGETS, list_linear_layers, resolve_targets

    if not args.model:
        raise UsageError("missing MODEL (see `crispedit targets --help`)")
    model, _ = load_model_from_args(args)
    layers = list_linear_layers(model)
    note = ""
    if args.targets:
        chosen = resolve_targets(model, args.targets)
        note = f"selected by --layers {args.targets!r}"
    else:
        model_type = getattr(model.config, "model_type", None)
        try:
            chosen = resolve_targets(model, None)
            note = f"default targets for model type {model_type!r} ({DEFAULT_TARGETS[model_type]})"
        except CrispEditError as e:
            chosen, note = [], e.message
    marked = set(chosen)
    rows = [[("* " if info.name in marked else "  ") + info.name, info.kind, f"{info.d_out}x{info.d_in}",
             "yes" if info.has_bias else "no"] for info in layers]
    echo(format_table(["  layer", "kind", "W (out x in)", "bias"], rows, align="llrl"))
    echo(f"\n{len(layers)} editable (Linear/Conv1D) layers; {len(chosen)} marked * — {note}")
    return 0


COMMANDS = [
    Command("targets", "list a model's editable linear layers and mark the target layers", add_arguments, run,
            description="List a model's Linear/Conv1D layers with their weight shapes (W is d_out x d_in) and "
                        "mark with * the targets an edit would use: the model type's defaults, or the layers "
                        "--layers selects."),
]
