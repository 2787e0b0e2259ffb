"""The `crispedit` command line.

Each subcommand lives in its own module that defines `COMMANDS: list[Command]` (see `common.Command`);
adding one is one module plus one line in `COMMAND_MODULES`. A minimal module:

    from crispedit.cli.common import Command, add_model_options, gamma_type

    def add_arguments(p):
        add_model_options(p)
        p.add_argument("--gamma", type=gamma_type, default=0.9, help="energy threshold")

    def run(args):               # args: defaults < --config file < flags; explicit(args, "gamma") tells
        ...                      # whether the user chose it. Raise CrispEditError for user errors.

    COMMANDS = [Command("edit", "edit a model", add_arguments, run)]
 Modules import their heavy dependencies
(torch, transformers) inside their `run` functions so that `crispedit --help` stays instant.

Exit status: 0 success, 2 a user error (printed as one line `crispedit: error: ...`; `--debug` adds
the traceback), 130 interrupted. Unexpected exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from functools import lru_cache
from typing import NoReturn, Sequence

from crispedit.cli.common import PROG, Command, UsageError, build_parser, normalise_spellings, resolve_options
from crispedit.errors import CrispEditError

COMMAND_MODULES = (
    "crispedit.cli.targets_cmd",
    "crispedit.cli.curvature_cmd",
    "crispedit.cli.edit_cmd",
    "crispedit.cli.eval_cmd",
    "crispedit.cli.demo_cmd",
    "crispedit.cli.study_cmd",
)

# Errors that come from what the user typed or pointed at, not from a bug.
USER_ERRORS = (CrispEditError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError, ValueError)


@lru_cache(maxsize=1)
def commands() -> tuple[Command, ...]:
    out: list[Command] = []
    for name in COMMAND_MODULES:
        out.extend(importlib.import_module(name).COMMANDS)
    return tuple(out)


def command_names() -> set[str]:
    return {c.name for c in commands()}


def error_line(e: BaseException) -> str:
    """One line describing a user error."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; returns the exit status (never raises for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CRISPEDIT_DEBUG", "") not in ("", "0")
    try:
        cmds = commands()
        parser, specs = build_parser(cmds)
        typed = parser.parse_args(normalise_spellings(argv, cmds))
        if not getattr(typed, "command", None):
            parser.print_help(sys.stderr)
            return 2
        args = resolve_options(specs[typed.command], typed)
        args.debug = debug
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: runs `run_cli` and exits with its status (raises SystemExit)."""
    sys.exit(run_cli(argv))


__all__ = ["COMMAND_MODULES", "Command", "UsageError", "commands", "main", "run_cli"]
