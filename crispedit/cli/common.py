"""What every subcommand shares: the `Command` registry entry, option parsing with config files, value
validators, model options and table printing.

Options come from three layers, later ones winning: the defaults declared by the command, a
`--config FILE` (YAML or JSON; keys are long option names, with dashes or underscores), and the flags
typed on the command line. To tell typed flags from defaults, every option's default is moved out of
argparse (which then only reports what was typed) into `Command` bookkeeping; help still shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from crispedit.errors import CrispEditError

PROG = "crispedit"
DTYPES = ("float32", "bfloat16", "float16", "auto")


class UsageError(CrispEditError):
    """A bad command line or config file (unknown option, invalid value, missing required option)."""


@dataclass(frozen=True)
class Command:
    """One subcommand. `spellings` are extra multi-word ways to call it, e.g. ("curvature", "merge")
    for `curvature-merge`. `run` returns an exit status (None means 0)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    spellings: tuple[tuple[str, ...], ...] = ()
    description: str | None = None


# ------------------------------------------------------------------------------------------ parser


class _Formatter(argparse.HelpFormatter):
    """Shows the command's declared default (kept outside argparse, see module docstring)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action, "crispedit_default", None)
        if default not in (None, False) and "default" not in text and action.option_strings:
            text += f" (default: {default})"
        return text


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UsageError`s (one line, exit status 2, see `run_cli`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


@dataclass
class _Spec:
    """What the registry learnt about one subcommand's options."""

    command: Command
    parser: CliParser
    defaults: dict[str, Any]
    required: list[argparse.Action]
    by_key: dict[str, argparse.Action]


def _prepare(command: Command, parser: CliParser) -> _Spec:
    """Move defaults and `required` out of argparse; index options by their config-file key."""
    defaults: dict[str, Any] = {}
    required: list[argparse.Action] = []
    by_key: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest in ("config", "debug"):
            continue
        if action.default is not argparse.SUPPRESS:
            if defaults.get(action.dest) is None:
                defaults[action.dest] = action.default
            action.crispedit_default = action.default  # type: ignore[attr-defined]
            action.default = argparse.SUPPRESS
        else:
            defaults.setdefault(action.dest, None)
        if action.option_strings and action.required:
            action.required = False
            action.help = f"{action.help or ''} (required)".strip()
            required.append(action)
        keys = [o[2:] for o in action.option_strings if o.startswith("--")] or [action.dest]
        for key in keys:
            by_key[config_key(key)] = action
    return _Spec(command, parser, defaults, required, by_key)


def config_key(name: str) -> str:
    return name.strip().lstrip("-").replace("_", "-").lower()


def build_parser(commands: Sequence[Command]) -> tuple[CliParser, dict[str, _Spec]]:
    from crispedit import __version__

    parser = CliParser(prog=PROG, description="Edit language models without breaking them (CrispEdit).",
                       epilog=f"Run `{PROG} COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)
    specs: dict[str, _Spec] = {}
    for cmd in commands:
        if cmd.name in specs:
            raise RuntimeError(f"two CLI commands are named {cmd.name!r}")
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
        p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="read options from a YAML or JSON file (keys: long option names); flags override it")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        specs[cmd.name] = _prepare(cmd, p)
    return parser, specs


def normalise_spellings(argv: list[str], commands: Sequence[Command]) -> list[str]:
    """Rewrite a multi-word spelling (`curvature merge ...`) into its command name (`curvature-merge ...`)."""
    i = next((k for k, tok in enumerate(argv) if not tok.startswith("-")), None)
    if i is None:
        return argv
    for cmd in commands:
        for words in cmd.spellings:
            if tuple(argv[i:i + len(words)]) == tuple(words):
                return argv[:i] + [cmd.name] + argv[i + len(words):]
    return argv


# ------------------------------------------------------------------------------------------ config files


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A mapping of options from a YAML (.yaml/.yml, or anything else) or JSON (.json) file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CrispEditError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CrispEditError(f"{p}: cannot read config file: {e}") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise CrispEditError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise CrispEditError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CrispEditError(f"{p}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A config value checked and converted the way argparse treats the same text on the command line."""
    if action.nargs == 0:  # store_true / store_false flags
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else not action.const
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(value, (list, tuple)) and not many:
        raise UsageError(f"{where}: expected a single value, got a list")
    if isinstance(value, dict):
        raise UsageError(f"{where}: expected a value, got a mapping")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if item is None:
            raise UsageError(f"{where}: missing value")
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            conv = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
        if action.choices is not None and conv not in action.choices:
            raise UsageError(f"{where}: invalid choice {conv!r} (choose from {', '.join(map(str, action.choices))})")
        out.append(conv)
    return out if many else out[0]


def config_values(spec: _Spec, data: dict[str, Any], source: str) -> dict[str, Any]:
    """Option values (by dest) from a config mapping. A key that names a command and holds a mapping is a
    section: the section of this command applies over the top level, other commands' sections are ignored,
    so one file can serve several commands."""
    from crispedit.cli import command_names

    flat = {k: v for k, v in data.items() if not (isinstance(v, dict) and k in command_names())}
    section = data.get(spec.command.name)
    if isinstance(section, dict):
        flat.update(section)
    values: dict[str, Any] = {}
    for key, value in flat.items():
        action = spec.by_key.get(config_key(str(key)))
        if action is None:
            known = ", ".join(sorted(spec.by_key))
            raise UsageError(f"{source}: unknown option {key!r} for `{PROG} {spec.command.name}` (known: {known})")
        values[action.dest] = _convert(action, value, f"{source}: option {key!r}")
    return values


def resolve_options(spec: _Spec, typed: argparse.Namespace) -> argparse.Namespace:
    """Defaults < config file < typed flags; then check required options. The result records which options
    the user set (`_explicit`, by config or flag) so commands can tell a choice from a default."""
    typed_values = {k: v for k, v in vars(typed).items() if k not in ("command", "debug", "config")}
    from_file: dict[str, Any] = {}
    if getattr(typed, "config", None):
        from_file = config_values(spec, load_config_file(typed.config), str(typed.config))
    values = dict(spec.defaults)
    values.update(from_file)
    values.update(typed_values)
    missing = [a for a in spec.required if values.get(a.dest) is None]
    if missing:
        names = ", ".join(max(a.option_strings, key=len) for a in missing)
        raise UsageError(f"missing required option(s) {names} (see `{spec.parser.prog} --help`)")
    ns = argparse.Namespace(**values)
    ns._explicit = set(from_file) | set(typed_values)
    ns._command = spec.command
    return ns


def explicit(args: argparse.Namespace, dest: str) -> bool:
    """Whether the user chose this option (on the command line or in a config file)."""
    return dest in getattr(args, "_explicit", set())


# ------------------------------------------------------------------------------------------ value types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def fraction(low: float = 0.0, high: float = 1.0, low_open: bool = True, high_open: bool = True
             ) -> Callable[[str], float]:
    """A float parser restricted to an interval, e.g. fraction() for γ in (0, 1), fraction(low_open=False)
    for a held-out share in [0, 1)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above or value != value:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


gamma_type = fraction()  # energy thresholds γ: strictly between 0 and 1


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value:g}")
    return value


# ------------------------------------------------------------------------------------------ models


MODEL_HELP = "a local model folder, a .gguf file, a Hugging Face hub id, or smollm2-135m-instruct (embedded)"


def add_model_options(p: argparse.ArgumentParser, required: bool = True, flag: str = "--model") -> None:
    """--model plus how to load it (--device, --dtype, --device-map, --trust-remote-code)."""
    p.add_argument(flag, dest="model", metavar="M", required=required, help=MODEL_HELP)
    add_loading_options(p)


def add_loading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")
    p.add_argument("--device-map", default=None,
                   help="passed to from_pretrained, e.g. 'auto' to spread a large model over the GPUs")
    p.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="allow the checkpoint's own Python code (off by default)")


def load_model_from_args(args: argparse.Namespace, device: str | None = None):
    """(model, tokenizer) as the options say; `device` overrides --device (e.g. a distributed rank's GPU)."""
    from crispedit.models import load_model

    return load_model(args.model, device=device or args.device, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code)


# ------------------------------------------------------------------------------------------ output


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun launch: those neither print nor write."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def echo(*parts: Any, file=None) -> None:
    if is_main_process():
        print(*parts, file=file or sys.stdout, flush=True)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table; `align` is one letter per column, 'l' or 'r' (default: first left, others right)."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
