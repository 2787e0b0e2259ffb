"""The `crispedit` command line: a thin shell that parses options, builds config objects, calls the library and
prints what it returns.

Each subcommand lives in its own module that defines `COMMANDS: list[Command]` (see `common.Command`);
adding one is one module plus one line in `COMMAND_MODULES`. Options of library settings are generated from
the config dataclasses (`crispedit.config`), so a new config field is a new flag. A minimal module:

    from crispedit.cli.common import Command, add_config_options, add_model_options, config_from_args
    from crispedit.config import EditConfig

    def add_arguments(p):
        add_model_options(p)
        add_config_options(p, EditConfig)      # --method, --gamma, ... with their defaults and checks

    def run(args):                             # args: defaults < --config file < flags
        cfg = config_from_args(args, EditConfig)
        ...                                    # library errors (CrispEditError) become one line

    COMMANDS = [Command("edit", "edit a model", add_arguments, run)]

Modules import their heavy dependencies (torch, transformers) inside their `run` functions so that
`crispedit --help` stays instant.

Exit status: 0 success, 2 a user error (a `CrispEditError` or an `OSError`, printed as one line
`crispedit: error: ...` with library parameters spelled as flags; `--debug` adds the traceback), 130
interrupted. Anything else is a bug and keeps its traceback. Library warnings are printed as
`crispedit: warning: ...`; `-v` shows the library's INFO log lines.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import warnings
from functools import lru_cache
from typing import NoReturn, Sequence

from crispedit.cli.common import (
    PROG,
    Command,
    UsageError,
    build_parser,
    error_line,
    is_main_process,
    normalise_spellings,
    resolve_options,
)
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
USER_ERRORS = (CrispEditError, OSError)


@lru_cache(maxsize=1)
def commands() -> tuple[Command, ...]:
    out: list[Command] = []
    for name in COMMAND_MODULES:
        out.extend(importlib.import_module(name).COMMANDS)
    return tuple(out)


def command_names() -> set[str]:
    return {c.name for c in commands()}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if is_main_process():
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


class _LogFormat(logging.Formatter):
    """`crispedit: MSG` for INFO and DEBUG lines, `crispedit: warning: MSG` (`error:`, ...) from WARNING up: a log
    warning reads like a `warnings.warn` one, so a user (or a grep) sees one kind of warning line."""

    def format(self, record: logging.LogRecord) -> str:
        tag = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{PROG}: {tag}{record.getMessage()}"


def _configure_logging(verbose: bool, debug: bool) -> tuple[logging.Handler, int]:
    """The library logs under `crispedit`; the CLI shows warnings, or INFO with -v (DEBUG with --debug), on
    rank 0 only. Returns the handler and the level before, to undo it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat())
    if not is_main_process():
        handler.addFilter(lambda record: False)
    log = logging.getLogger("crispedit")
    before = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    return handler, before


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; returns the exit status (never raises for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CRISPEDIT_DEBUG", "") not in ("", "0")
    verbose = "-v" in argv or "--verbose" in argv
    handler, level = _configure_logging(verbose, debug)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            cmds = commands()
            parser, specs = build_parser(cmds)
            typed = parser.parse_args(normalise_spellings(argv, cmds))
            if not getattr(typed, "command", None):
                parser.print_help(sys.stderr)
                return 2
            args = resolve_options(specs[typed.command], typed, command_names())
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
    finally:
        logging.getLogger("crispedit").removeHandler(handler)
        logging.getLogger("crispedit").setLevel(level)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: runs `run_cli` and exits with its status (raises SystemExit)."""
    sys.exit(run_cli(argv))


__all__ = ["COMMAND_MODULES", "Command", "UsageError", "commands", "main", "run_cli"]
