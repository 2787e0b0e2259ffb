"""What every subcommand shares: the `Command` registry entry, options generated from the config dataclasses,
config files, the model options, how library errors are spelled on the command line, and output helpers.

Options come from three layers, later ones winning: the defaults (declared once, in `crispedit.config` or by
the command for its own paths and switches), a `--config FILE` (YAML or JSON; keys are long option names, with
dashes or underscores, or config field names), and the flags typed on the command line. Every option's default
is kept out of argparse (which then reports only what was typed), so `given(args, Config)` can tell a choice
from a default; `--help` still shows the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from crispedit.config import Choice, FieldSpec, LoadConfig, config_fields, parse_text
from crispedit.errors import CrispEditError
from crispedit.tables import format_table  # noqa: F401 - commands import it from here

PROG = "crispedit"
MODEL_HELP = "a local model folder, a .gguf file, a Hugging Face hub id, or smollm2-135m-instruct (embedded)"


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
    """Shows each option's default (kept outside argparse, see the module docstring)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action, "crispedit_default", None)
        if default not in (None, False, ()) and "default" not in text and action.option_strings and action.nargs != 0:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
        return text


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UsageError`s (one line, exit status 2, see `run_cli`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _text_type(spec: FieldSpec) -> Callable[[str], Any]:
    """argparse `type=` for a config field: `parse_text`, with its message as argparse's."""

    def parse(text: str) -> Any:
        try:
            return parse_text(spec, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = spec.describe()
    return parse


def add_config_options(p: argparse.ArgumentParser, cls: type, *, only: Sequence[str] | None = None,
                       exclude: Sequence[str] = (), overrides: dict[str, dict[str, Any]] | None = None,
                       prefix: str | None = None) -> None:
    """One option per documented field of the dataclass `cls` (see `crispedit.config.option`).

    The flag is `--field-name` unless the field names another; a field whose default is True gets `--no-...`;
    `overrides` changes a field's default or metadata for this command only (e.g. another default size);
    `prefix` puts the config's own fields beside another config's same-named ones (`--memit-seed`, destination
    `memit_seed`; read them back with the same `prefix`)."""
    for spec in config_fields(cls):
        if not spec.meta.get("cli", True) or spec.name in exclude or (only is not None and spec.name not in only):
            continue
        over = dict((overrides or {}).get(spec.name, {}))
        default = over.pop("default", spec.default)
        spec = FieldSpec(spec.name, spec.kind, spec.optional, spec.many, default, {**spec.meta, **over})
        meta = spec.meta
        flag = meta.get("flag") or "--" + spec.name.replace("_", "-")
        if prefix:
            flag = f"--{prefix}-{flag[2:]}"
            meta = {**meta, "aliases": tuple(f"--{prefix}-{a[2:]}" for a in meta.get("aliases", ())),
                    "const_flags": {f"--{prefix}-{k[2:]}": v for k, v in meta.get("const_flags", {}).items()}}
        dest = f"{prefix}_{spec.name}" if prefix else spec.name
        kw: dict[str, Any] = {"dest": dest, "default": default, "help": meta.get("help")}
        if spec.kind is bool and not spec.many:
            names = ["--no-" + flag[2:]] if default is True else [flag, *meta.get("aliases", ())]
            kw["action"] = "store_false" if default is True else "store_true"
            if default is True:
                kw["help"] = meta.get("off_help") or f"turn off: {meta.get('help')}"
        else:
            names = [flag, *meta.get("aliases", ())]
            kw["metavar"] = meta.get("metavar") or (spec.name.upper() if prefix else None)
            if issubclass(spec.kind, Choice) and not spec.many:
                kw["choices"] = tuple(meta.get("cli_choices") or spec.allowed or ())
            else:
                kw["type"] = _text_type(spec)
        action = p.add_argument(*names, **kw)
        action.crispedit_field = spec  # type: ignore[attr-defined]
        for const_flag, value in meta.get("const_flags", {}).items():
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            alias = p.add_argument(const_flag, dest=dest, action="store_const", const=value, default=default,
                                   help=f"the same as {flag} {shown}")
            alias.crispedit_field = spec  # type: ignore[attr-defined]


@dataclass
class _Spec:
    """What the registry learnt about one subcommand's options."""

    command: Command
    parser: CliParser
    defaults: dict[str, Any]
    required: list[argparse.Action]
    by_key: dict[str, argparse.Action]


def config_key(name: str) -> str:
    return name.strip().lstrip("-").replace("_", "-").lower()


def _prepare(command: Command, parser: CliParser) -> _Spec:
    """Move defaults and `required` out of argparse; index options by their config-file keys."""
    defaults: dict[str, Any] = {}
    required: list[argparse.Action] = []
    by_key: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest in ("config", "debug",
                                                                                                   "verbose"):
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
        if isinstance(action, argparse._StoreAction):  # a value option also answers to its field name
            keys.append(action.dest)
        for key in keys:
            by_key.setdefault(config_key(key), action)
    return _Spec(command, parser, defaults, required, by_key)


def build_parser(commands: Sequence[Command]) -> tuple[CliParser, dict[str, _Spec]]:
    from crispedit import __version__

    parser = CliParser(prog=PROG, description="Edit language models without breaking them (CrispEdit).",
                       epilog=f"Run `{PROG} COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does (INFO)")
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
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
    """A config-file value checked and converted the way the same text is on the command line."""
    if action.nargs == 0:  # store_true / store_false / store_const flags
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        if isinstance(action, argparse._StoreConstAction) and not isinstance(action.const, bool):
            return action.const if value else getattr(action, "crispedit_default", None)
        return action.const if value else not action.const
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    spec: FieldSpec | None = getattr(action, "crispedit_field", None)
    if isinstance(value, dict):
        raise UsageError(f"{where}: expected a value, got a mapping")
    if isinstance(value, (list, tuple)) and not many:
        if spec is not None and spec.many:  # a YAML list for a comma-list field
            value = ",".join(map(str, value)) or "none"
        else:
            raise UsageError(f"{where}: expected a single value, got a list")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if item is None:
            if spec is not None and spec.optional:
                out.append(None)
                continue
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


def config_values(spec: _Spec, data: dict[str, Any], source: str, command_names: set[str]) -> dict[str, Any]:
    """Option values (by dest) from a config mapping. A key that names a command and holds a mapping is a
    section: the section of this command applies over the top level, other commands' sections are ignored,
    so one file can serve several commands."""
    flat = {k: v for k, v in data.items() if not (isinstance(v, dict) and k in command_names)}
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


def resolve_options(spec: _Spec, typed: argparse.Namespace, command_names: set[str]) -> argparse.Namespace:
    """Defaults < config file < typed flags; then check required options. The result records which options
    the user set (by config or flag), for `given`."""
    typed_values = {k: v for k, v in vars(typed).items() if k not in ("command", "debug", "verbose", "config")}
    from_file: dict[str, Any] = {}
    if getattr(typed, "config", None):
        from_file = config_values(spec, load_config_file(typed.config), str(typed.config), command_names)
    values = dict(spec.defaults)
    values.update(from_file)
    values.update(typed_values)
    missing = [a for a in spec.required if values.get(a.dest) is None]
    if missing:
        names = ", ".join(max(a.option_strings, key=len) for a in missing)
        raise UsageError(f"missing required option(s) {names} (see `{spec.parser.prog} --help`)")
    ns = argparse.Namespace(**values)
    ns._given = set(from_file) | set(typed_values)
    ns._command = spec.command
    return ns


def _dest(name: str, prefix: str | None) -> str:
    return f"{prefix}_{name}" if prefix else name


def config_from_args(args: argparse.Namespace, cls: type, prefix: str | None = None, **fixed: Any) -> Any:
    """`cls(...)` from the options the command registered for its fields (others keep their defaults)."""
    values = {s.name: getattr(args, _dest(s.name, prefix)) for s in config_fields(cls)
              if hasattr(args, _dest(s.name, prefix))}
    values.update(fixed)
    return cls(**values)


def given(args: argparse.Namespace, cls: type, prefix: str | None = None) -> dict[str, Any]:
    """The fields of `cls` the user chose (by flag or config file), e.g. to inherit the rest from a cache."""
    chosen = getattr(args, "_given", set())
    return {s.name: getattr(args, _dest(s.name, prefix)) for s in config_fields(cls) if _dest(s.name, prefix) in chosen}


# ------------------------------------------------------------------------------------------ models


def add_model_options(p: argparse.ArgumentParser, required: bool = True, flag: str = "--model") -> None:
    """--model plus how to load it (the `LoadConfig` options: --device, --dtype, --device-map...)."""
    p.add_argument(flag, dest="model", metavar="M", required=required, help=MODEL_HELP)
    add_config_options(p, LoadConfig)


def load_model_from_args(args: argparse.Namespace, device: str | None = None, spec: str | None = None):
    """(model, tokenizer) as the options say; `device` overrides --device (e.g. a distributed rank's GPU),
    `spec` overrides --model."""
    from crispedit.models import load_model

    cfg = config_from_args(args, LoadConfig, **({"device": device} if device else {}))
    return load_model(spec or args.model, **cfg.to_dict())


# ------------------------------------------------------------------------------------------ errors


# Library parameters that have a command-line spelling of their own (config fields map to their flags).
PARAMETER_FLAGS = {"allow_mismatch": "--allow-cache-mismatch", "overwrite": "--force", "curvature": "--curvature CACHE",
                   "curvature_path": "--curvature CACHE", "resume": "--resume", "model": "--model M"}


@lru_cache(maxsize=1)
def _field_flags() -> dict[str, tuple[str, str]]:
    from crispedit import config

    out: dict[str, tuple[str, str]] = {}
    for cls in (config.LoadConfig, config.CorpusConfig, config.CurvatureConfig, config.EditConfig,
                config.EvalConfig):
        for s in config_fields(cls):
            flag = s.meta.get("flag") or "--" + s.name.replace("_", "-")
            out.setdefault(s.name, (flag, s.meta.get("metavar") or s.name.upper()))
    return out


def cli_spelling(name: str, value: Any) -> str:
    """How the command line says "set parameter `name` to `value`" (for library error messages)."""
    if name in PARAMETER_FLAGS:
        flag = PARAMETER_FLAGS[name]
        return flag if value is ... or value is True else f"{flag.split()[0]} {value}"
    flag, metavar = _field_flags().get(name, ("--" + name.replace("_", "-"), name.upper()))
    if value is ...:
        return f"{flag} {metavar}"
    return flag if value is True else f"{flag} {value}"


def error_line(e: BaseException) -> str:
    """One line describing a user error, with library parameters spelled as flags."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    text = e.render(cli_spelling) if isinstance(e, CrispEditError) else str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


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
